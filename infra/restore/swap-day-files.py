"""Put rebuilt day files in place of the live ones, each under the writer's own lock.

`datastore replay --out DIR` rebuilds day files into DIR with the live tree's layout
(<YYYY>/<M>/<YYYY>_<M>_<D>.h5).  This moves each of them into the data directory:

- under an exclusive flock on <day file>.lock, the lock every append of the writer holds,
  so it never lands in the middle of an append (it waits for one to finish) and the next
  append opens the new file (the writer opens a day file per append, never keeps it);
- the live file is first hard-linked into <data dir>/.replaced-<UTC time>/ (same layout),
  then the rebuilt one renamed over it: one atomic rename, so a reader sees the old file
  or the new one, never none.  Readers that have the old file open keep reading it.

Both directories must be on the same file system (put DIR on the volume, e.g.
/data/.rebuilt).  Only the Python standard library: it runs in the writer pod, fed on stdin:

    kubectl exec -i -n hisparc-datastore -c writer "$(writer_pod)" -- \
        python - --data-dir /data --rebuilt /data/.rebuilt < infra/restore/swap-day-files.py

--dry-run says what it would do.  Exit status 0 when every file was swapped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import re
import sys
from pathlib import Path

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
DAY_FILE = re.compile(r"(\d{4})/(\d{1,2})/(\d{4})_(\d{1,2})_(\d{1,2})\.h5")


def day_files(rebuilt: Path) -> list[Path]:
    """The rebuilt day files, as paths relative to `rebuilt`; refuses anything else."""
    found = []
    for path in sorted(rebuilt.rglob("*.h5")):
        relative = path.relative_to(rebuilt)
        match = DAY_FILE.fullmatch(relative.as_posix())
        if not match or match.group(1) != match.group(3) or match.group(2) != match.group(4):
            raise SystemExit(f"{path}: not a day file of the <YYYY>/<M>/<YYYY>_<M>_<D>.h5 layout")
        with path.open("rb") as handle:
            if handle.read(len(HDF5_SIGNATURE)) != HDF5_SIGNATURE:
                raise SystemExit(f"{path}: not an HDF5 file")
        found.append(relative)
    return found


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap(data_dir: Path, rebuilt: Path, relative: Path, aside: Path) -> str:
    live = data_dir / relative
    new = rebuilt / relative
    live.parent.mkdir(parents=True, exist_ok=True)
    lock_path = live.with_name(live.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for an append in progress
        if live.exists():
            kept = aside / relative
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.link(live, kept)
            os.replace(new, live)
            fsync_directory(live.parent)
            return f"{live}: replaced (the old file is {kept})"
        os.replace(new, live)
        fsync_directory(live.parent)
        return f"{live}: put in place (there was none)"
    finally:
        os.close(fd)  # releases the lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the live tree, e.g. /data")
    parser.add_argument("--rebuilt", type=Path, required=True,
                        help="the --out directory of `datastore replay`")
    parser.add_argument("--dry-run", action="store_true", help="say what would be done")
    args = parser.parse_args(argv)
    data_dir, rebuilt = args.data_dir.resolve(), args.rebuilt.resolve()
    if not data_dir.is_dir() or not rebuilt.is_dir():
        raise SystemExit(f"{data_dir} and {rebuilt} must both be directories")
    if rebuilt == data_dir:
        raise SystemExit("--rebuilt is the data directory itself")
    if os.stat(data_dir).st_dev != os.stat(rebuilt).st_dev:
        raise SystemExit(f"{rebuilt} is not on the file system of {data_dir}: a rename cannot "
                         "move it there (replay into a directory on the same volume)")
    files = day_files(rebuilt)
    if not files:
        raise SystemExit(f"no day files under {rebuilt}")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = data_dir / f".replaced-{stamp}"
    for relative in files:
        if args.dry_run:
            state = "replace" if (data_dir / relative).exists() else "put in place"
            print(f"{data_dir / relative}: would {state} with {rebuilt / relative}")
        else:
            print(swap(data_dir, rebuilt, relative, aside), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
