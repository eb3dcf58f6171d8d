"""Runs inside a function image (scripts/image-check.sh mounts it): does the image hold
exactly what it runs?

    python image_contents.py LOCK FUNCTION

- the runtime venv's distributions are the lock's, at the lock's versions, plus the
  project itself, and nothing else (no pip, setuptools or wheel either);
- the function's own imports work, and modules the function does not run are absent
  (the upload image has no h5py; neither image has PyTables, pytest, boto3 or the
  development tools);
- ``datastore --help`` lists only the commands that run in an image.

Only the standard library is used: the image has nothing else to offer.  Prints one line
per check and exits 1 if any failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

PROJECT = "hisparc-datastore"
#: What `datastore` offers in an image: the operator commands and the launcher.
IMAGE_COMMANDS = {"sweep", "status", "replay", "import-legacy", "failed", "serve"}
#: Modules each image imports when it serves (a missing one fails at start-up anyway,
#: but here it fails with its name).
NEEDED = {
    "upload": ["hisparc_datastore.serve", "hisparc_datastore.serve_async",
               "hisparc_datastore.upload.protocol", "obstore", "numpy", "prometheus_client",
               "functions_framework", "gunicorn", "uvicorn", "uvloop", "httptools"],
    "writer": ["hisparc_datastore.serve", "hisparc_datastore.writer.service", "obstore",
               "numpy", "h5py", "tqdm", "prometheus_client", "functions_framework",
               "gunicorn"],
}
#: Modules that must not be there.
ABSENT = {
    "upload": ["pip", "setuptools", "wheel", "h5py", "tables", "pytest", "boto3",
               "hisparc_datastore_dev"],
    "writer": ["pip", "setuptools", "wheel", "tables", "pytest", "boto3",
               "hisparc_datastore_dev"],
}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock_path: str, function: str) -> int:
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(("ok    " if ok else "FAIL  ") + what)
        if not ok:
            failures.append(what)

    with open(lock_path, encoding="utf-8") as handle:
        locked = {normalize(name): version for name, version in _PIN.findall(handle.read())}
    installed = {normalize(dist.metadata["Name"]): dist.version
                 for dist in importlib.metadata.distributions()}
    check(PROJECT in installed, f"{PROJECT} {installed.get(PROJECT, '-')} is installed")
    extra = sorted(set(installed) - set(locked) - {PROJECT})
    check(not extra, f"nothing installed beyond the lock ({', '.join(extra) or 'none'})")
    missing = sorted(set(locked) - set(installed))
    check(not missing, f"every locked package installed ({', '.join(missing) or 'all'})")
    other = sorted(f"{name} {installed[name]} != {version}" for name, version in locked.items()
                   if name in installed and installed[name] != version)
    check(not other, f"at the lock's versions ({'; '.join(other) or f'{len(locked)} of them'})")

    for module in NEEDED[function]:
        try:
            importlib.import_module(module)
            check(True, f"imports {module}")
        except Exception as exc:  # any failure is reported as one
            check(False, f"imports {module}: {exc!r}")
    present = [module for module in ABSENT[function] if importlib.util.find_spec(module)]
    check(not present, f"absent: {', '.join(ABSENT[function])}"
          + (f" (found: {', '.join(present)})" if present else ""))

    datastore = os.path.join(os.path.dirname(sys.executable), "datastore")
    result = subprocess.run([datastore, "--help"], capture_output=True, text=True,
                            timeout=60, check=False)
    # argparse lists each subcommand on a line of its own, indented by four spaces.
    commands = set(re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", result.stdout, re.M))
    check(result.returncode == 0 and commands == IMAGE_COMMANDS,
          f"datastore --help lists {', '.join(sorted(commands)) or result.stderr.strip()}")

    import gunicorn.config

    disable = "control_socket_disable" in gunicorn.config.Config().settings
    print(f"info  gunicorn {importlib.metadata.version('gunicorn')}"
          f"{', control socket turned off by serve.py' if disable else ''};"
          f" Python {sys.version.split()[0]} at {sys.executable}")
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in NEEDED:
        sys.exit(f"usage: {sys.argv[0]} LOCK upload|writer")
    sys.exit(main(sys.argv[1], sys.argv[2]))
