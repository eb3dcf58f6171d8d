"""``datastore local`` end to end, as a user runs it, plus the stack's small pure parts.

The end-to-end test starts the real stack (SeaweedFS and both functions served by
functions-framework) as a subprocess on a temporary state directory and free ports,
uploads with ``datastore simulate`` (Python 2 and Python 3 pickles), reads the rows back
with PyTables, checks ``datastore status``, stops the stack with SIGINT and checks that no
process is left, then starts it again on the same state directory: nothing lost, and new
uploads still arrive.  The first run delivers uploads through SeaweedFS's webhook only
(its sweep interval is longer than the test), the second through the sweep only.
Waits poll with generous deadlines that only a broken stack reaches.
"""

from __future__ import annotations

import base64
import calendar
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hisparc_datastore_dev import local

from hisparc_datastore.config import load_settings, stack_environment
from hisparc_datastore.stations import Station
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.notifications import parse_notification

T = TypeVar("T")

# A body SeaweedFS 4.x posted for an object created through its S3 gateway.
FILER_CREATE = {
    "event_type": "create",
    "key": "/buckets/hisparc-datastore/incoming/501/aed563ecafb4bcc5654c597a421547b2.pickle",
    "message": {
        "new_entry": {
            "name": "aed563ecafb4bcc5654c597a421547b2.pickle",
            "chunks": [{"size": 100, "e_tag": "rtVj7K+0vMVlTFl6QhVHsg=="}],
            "attributes": {"file_size": 100, "mtime": 1795595639, "file_mode": 432},
            "extended": {
                "Seaweed-X-Amz-ETag": "YWVkNTYzZWNhZmI0YmNjNTY1NGM1OTdhNDIxNTQ3YjI=",
                "X-Amz-Meta-Station": "NTAx",
            },
        },
        "delete_chunks": True,
        "new_parent_path": "/buckets/hisparc-datastore/incoming/501",
    },
}


# ----------------------------------------------------------------------- pure parts


def test_filer_events_become_s3_records_the_writer_understands() -> None:
    document = local.filer_event_to_s3(json.dumps(FILER_CREATE).encode(), "hisparc-datastore")
    assert document is not None
    notification = parse_notification(
        {"Content-Type": "application/json"}, json.dumps(document).encode(),
        bucket="hisparc-datastore",
    )
    assert [ref.key for ref in notification.keys] == [
        "incoming/501/aed563ecafb4bcc5654c597a421547b2.pickle"
    ]


def test_filer_events_the_writer_must_not_see() -> None:
    def variant(**changes: Any) -> bytes:
        return json.dumps({**FILER_CREATE, **changes}).encode()

    directory = {"new_entry": {"name": "501", "is_directory": True}}
    for body in (
        variant(event_type="delete"),
        variant(event_type="rename"),
        variant(key="/buckets/hisparc-datastore/archive/2026/11/25/501/x.pickle"),
        variant(key="/buckets/other-bucket/incoming/501/x.pickle"),
        variant(key="/buckets/hisparc-datastore/incoming/501", message=directory),
        variant(message={"old_entry": {"name": "x"}}),
    ):
        assert local.filer_event_to_s3(body, "hisparc-datastore") is None
    updated = local.filer_event_to_s3(variant(event_type="update"), "hisparc-datastore")
    assert updated is not None  # a station resending a batch overwrites its object
    for garbage in (b"not json", b"[]", b'{"event_type": "create"}'):
        with pytest.raises(ValueError):
            local.filer_event_to_s3(garbage, "hisparc-datastore")


def test_state_dir_credentials_and_station_persist(tmp_path: Path) -> None:
    files = local.StackFiles.at(tmp_path)
    first = local.ensure_credentials(files)
    assert local.ensure_credentials(files) == first
    assert files.credentials.stat().st_mode & 0o777 == 0o600
    assert set(first) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                          "DATASTORE_WRITER_AUTH_TOKEN"}
    stations = local.ensure_station_list(files, 3)
    assert [(s.number, s.cluster) for s in stations] == [
        (501, "Amsterdam"), (502, "Amsterdam"), (503, "Amsterdam")
    ]
    assert len({s.password for s in stations}) == 3 and all(s.password for s in stations)
    assert files.stations.stat().st_mode & 0o777 == 0o600
    assert local.ensure_station_list(files, 3) == stations
    assert local.ensure_station_list(files, 1) == stations[:1]
    more = local.ensure_station_list(files, 5)  # appended; the first three unchanged
    assert more[:3] == stations and [s.number for s in more[3:]] == [504, 505]

    # A user's list is kept as it is: new stations take the free numbers after it.
    files.stations.write_text("7001,Leiden,secret\n501,Amsterdam,x")  # no final newline
    chosen = local.ensure_station_list(files, 3)
    assert [s.number for s in chosen] == [7001, 501, 502]
    lines = files.stations.read_text().splitlines()
    assert lines[:2] == ["7001,Leiden,secret", "501,Amsterdam,x"]
    assert lines[2].startswith("502,Amsterdam,") and len(lines) == 3


def test_a_stack_json_of_one_station_still_reads(tmp_path: Path) -> None:
    """A stack started before stack.json listed several stations is still found."""
    old = {"pid": 1, "upload_url": "u", "writer_url": "w", "s3_endpoint": "s", "bucket": "b",
           "data_dir": "d", "config": "c", "station": 501, "password": "pw",
           "children": {"seaweedfs": 2}}
    local.StackFiles.at(tmp_path).info.write_text(json.dumps(old))
    info = local.read_stack_info(tmp_path)
    assert info is not None and info.children == {"seaweedfs": 2}
    assert info.demo_stations() == [Station(501, "Amsterdam", "pw")]


def test_the_banner_spells_datastore_as_it_can_be_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "datastore"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)

    def spelled(environ: dict[str, str], prefix: Path = venv) -> str:
        return local.datastore_command(environ, str(prefix), base_prefix="/usr")

    assert spelled({"PATH": "/usr/bin"}) == ".venv/bin/datastore"  # make run: not active
    assert spelled({"PATH": "/usr/bin", "VIRTUAL_ENV": str(venv)}) == "datastore"
    assert spelled({"PATH": f"{venv / 'bin'}:/usr/bin"}) == "datastore"
    assert spelled({"VIRTUAL_ENV": str(tmp_path / "other")}) == ".venv/bin/datastore"
    assert local.datastore_command({}, "/usr", base_prefix="/usr") == "datastore"  # no venv
    assert spelled({}, tmp_path / "no-script") == "datastore"


def test_the_banner_lists_the_stations_and_commands_that_work(tmp_path: Path) -> None:
    files = local.StackFiles.at(tmp_path / "state")
    options = local.Options(state_dir=files.root)

    def banner(count: int, datastore: str) -> str:
        stations = [{"number": 500 + n, "cluster": "Amsterdam", "password": f"pw{n}"}
                    for n in range(1, count + 1)]
        info = local.StackInfo(
            pid=1, upload_url="http://127.0.0.1:8080/", writer_url="http://127.0.0.1:8081/",
            s3_endpoint="http://127.0.0.1:8333", bucket="hisparc-datastore",
            data_dir=str(files.data), config=str(files.config), stations=stations,
            children={},
        )
        return local.banner(info, files, options, datastore)

    text = banner(3, ".venv/bin/datastore")
    for n in (1, 2, 3):
        assert re.search(rf"^  (demo stations)?\s+50{n}  Amsterdam  password pw{n}$", text, re.M)
    lines = text.splitlines()
    commands = [lines[n + 1].strip() for n, line in enumerate(lines)
                if line.startswith("  # ")]
    assert [command.split()[:2] for command in commands] == [
        [".venv/bin/datastore", "simulate"], [".venv/bin/datastore", "simulate"],
        [".venv/bin/datastore", "status"],
    ]
    assert "--stations 3 --rate 1 --duration 20" in commands[1]
    assert all(f"--state-dir {files.root}" in command for command in commands)
    assert "`. .venv/bin/activate`" in text
    assert "`.venv/bin/datastore sweep`" in text

    single = banner(1, "datastore")
    assert "  demo station    501  Amsterdam  password pw1" in single
    assert "activate" not in single and "--stations" not in single
    assert "`datastore sweep`" in single

    many = banner(6, "datastore")
    assert "504  Amsterdam  password pw4" in many and "pw5" not in many
    assert f"and 2 more in {files.stations}" in many


def test_other_commands_find_the_stack_unless_told_otherwise(tmp_path: Path) -> None:
    files = local.StackFiles.at(tmp_path)
    assert stack_environment(tmp_path, {}) == {}  # no stack there: unchanged
    credentials = local.ensure_credentials(files)
    files.config.write_text(local.render_config(files, "http://127.0.0.1:1", 3))
    found = stack_environment(tmp_path, {"AWS_ACCESS_KEY_ID": "mine"})
    assert found["DATASTORE_CONFIG"] == str(files.config)
    assert found["AWS_ACCESS_KEY_ID"] == "mine"
    assert found["AWS_SECRET_ACCESS_KEY"] == credentials["AWS_SECRET_ACCESS_KEY"]
    settings = load_settings(found)
    assert settings.writer_sleep == 3
    assert settings.bucket_endpoint == "http://127.0.0.1:1"
    assert settings.data_dir == files.data.resolve()
    explicit = {"DATASTORE_CONFIG": "/etc/elsewhere.ini"}
    assert stack_environment(tmp_path, explicit) == explicit


# ----------------------------------------------------------------------- end to end


def _environment() -> dict[str, str]:
    """The user's shell: no datastore or AWS settings of the test run leak in."""
    return {
        name: value for name, value in os.environ.items()
        if not name.startswith(("DATASTORE_", "AWS_"))
    }


def datastore(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "hisparc_datastore.cli", *args],
            cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # what the stack's functions logged meanwhile
        state = Path(args[args.index("--state-dir") + 1]) if "--state-dir" in args else None
        logs = sorted(state.glob("logs/*.log")) if state else []
        tails = "\n".join(f"--- {log.name}\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-25:]) for log in logs)
        raise AssertionError(f"datastore {' '.join(args[:1])} ran over {timeout:.0f} s; "
                             f"output: {exc.stdout!r} {exc.stderr!r}\n{tails}") from exc


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Stack:
    """One ``datastore local`` subprocess."""

    def __init__(self, state: Path, cwd: Path, *options: str) -> None:
        self.state = state
        self.output = cwd / f"local-{time.monotonic_ns()}.out"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hisparc_datastore.cli", "local",
                 "--state-dir", str(state), "--upload-port", "0", "--writer-port", "0",
                 "--s3-port", "0", *options],
                cwd=cwd, env=_environment(), stdout=out, stderr=subprocess.STDOUT,
            )
        self.info = wait_for("the stack to publish stack.json", self._published)

    def _published(self) -> local.StackInfo | None:
        if self.process.poll() is not None:
            raise AssertionError(f"datastore local exited:\n{self.output.read_text()}")
        info = local.read_stack_info(self.state)
        return info if info and info.pid == self.process.pid else None

    def bucket(self) -> Bucket:
        return Bucket.from_settings(load_settings(stack_environment(self.state, {})))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(60) == 0, self.output.read_text()
        return self.output.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def clean_up(self) -> None:
        """After a failed test: stop the stack, and whatever it started, by their pids."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        for pid in self.info.children.values():
            if process_groups().get(pid):
                os.killpg(pid, signal.SIGKILL)


def process_groups() -> dict[int, list[int]]:
    """Every live process's group id -> its pids (zombies excluded)."""
    groups: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        groups.setdefault(int(fields[2]), []).append(int(entry.name))
    return groups


def expected_batches(seed: int, start: dt.datetime, size: int, count: int,
                     station: int = 501) -> list[list[dict]]:
    from hisparc_datastore_dev import simulate

    batches = simulate.station_batches(station, size, start, seed)
    return [next(batches) for _ in range(count)]


def table_counts(batches: list[list[dict]]) -> Counter[str]:
    from hisparc_datastore.format.schema import EVENT_TYPES

    return Counter(
        EVENT_TYPES[event["header"]["eventtype_uploadcode"]].table
        for batch in batches for event in batch
    )


def read_station(path: Path, cluster: str, station: int) -> dict[str, Any] | None:
    """Every table and the blobs of one station, through PyTables; None while unreadable."""
    import tables

    if not path.exists():
        return None
    try:
        with tables.open_file(str(path), "r") as handle:
            group = handle.get_node(f"/hisparc/cluster_{cluster.lower()}/station_{station}")
            content: dict[str, Any] = {
                node.name: node.read() for node in group if isinstance(node, tables.Table)
            }
            content["blobs"] = group.blobs.read()
            return content
    except (OSError, tables.NoSuchNodeError, tables.HDF5ExtError):
        return None


def _values(event: dict[str, Any]) -> dict[str, Any]:
    return {item["data_uploadcode"]: item["data"] for item in event["datalist"]}


def check_events(content: dict[str, Any], batches: list[list[dict]]) -> None:
    """The CIC events of ``batches`` are in the file with their times, values and traces."""
    rows = {int(row["ext_timestamp"]): row for row in content["events"]}
    for event in (e for batch in batches for e in batch
                  if e["header"]["eventtype_uploadcode"] == "CIC"):
        header = event["header"]
        timestamp = calendar.timegm(header["datetime"].utctimetuple())
        row = rows[timestamp * 1_000_000_000 + int(header["nanoseconds"])]
        assert row["timestamp"] == timestamp
        values = _values(event)
        assert list(row["pulseheights"]) == [int(values[f"PH{n}"]) for n in range(1, 5)]
        assert list(row["integrals"]) == [int(values[f"IN{n}"]) for n in range(1, 5)]
        for channel in range(4):
            stored = content["blobs"][row["traces"][channel]]
            assert stored == base64.b64decode(values[f"TR{channel + 1}"])
            samples = zlib.decompress(stored).decode().split(",")
            assert len(samples) > 100


def status_rows(output: str, table: str, day: str) -> int:
    lines = output.splitlines()
    header = next(line for line in lines if line.strip().startswith("rows per table"))
    column = header.split()[3:].index(day)
    row = next(line for line in lines if line.split() and line.split()[0] == table)
    return int(row.split()[1 + column])


def prefix_objects(output: str, prefix: str) -> int:
    line = next(line for line in output.splitlines() if line.split()[:1] == [prefix])
    return int(line.split()[1])


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.clean_up()


@pytest.mark.long
@pytest.mark.timeout(300)
def test_local_stack_end_to_end(tmp_path: Path, stacks: list[Stack]) -> None:
    import tables  # noqa: F401 (the read-back needs PyTables)

    state = tmp_path / "state"
    day = dt.date(2024, 3, 5)
    py2_start = dt.datetime(2024, 3, 5, 12, 0, 0)
    py3_start = dt.datetime(2024, 3, 5, 18, 0, 0)
    size, count = 40, 2

    # First run: the sweep interval is longer than the test, so the webhook delivers.
    stack = Stack(state, tmp_path, "--sleep", "3600")
    stacks.append(stack)
    info = stack.info
    demo = info.demo_stations()
    assert [station.number for station in demo] == [501, 502, 503]  # --stations 3
    banner = stack.output.read_text()
    assert info.upload_url in banner
    for station in demo:
        assert f"{station.number}  Amsterdam  password {station.password}" in banner
    # The banner's commands work as printed, from where the stack was started.
    status_command = next(line.split() for line in banner.splitlines()
                          if line.split()[1:2] == ["status"])
    printed = subprocess.run(status_command, cwd=tmp_path, env=_environment(),
                             capture_output=True, text=True, timeout=120, check=False)
    assert printed.returncode == 0, f"{status_command}: {printed.stderr}"
    assert "Bucket hisparc-datastore" in printed.stdout

    for flavour, start, seed in (("py2", py2_start, 1), ("py3", py3_start, 2)):
        result = datastore(
            "simulate", "--state-dir", str(state), "--pickle", flavour, "--seed", str(seed),
            "--start", start.isoformat(), "--batches", str(count), "--batch-size", str(size),
            "--max-retries", "3", cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(rf"batches accepted\s+{count} of {count}", result.stdout)
        assert re.search(r"answers\s+100 \(stored\) x2$", result.stdout, re.MULTILINE)

    py2_batches = expected_batches(1, py2_start, size, count)
    py3_batches = expected_batches(2, py3_start, size, count)
    expected = table_counts(py2_batches) + table_counts(py3_batches)
    assert len(expected) == 14  # every event type is exercised
    day_file = Path(info.data_dir) / "2024" / "3" / "2024_3_5.h5"

    def complete() -> dict[str, Any] | None:
        content = read_station(day_file, "Amsterdam", 501)
        if content and all(len(content.get(t, ())) == n for t, n in expected.items()):
            return content
        return None

    content = wait_for("every row in HDF5", complete)
    check_events(content, py2_batches)
    check_events(content, py3_batches)
    bucket = stack.bucket()
    wait_for("all objects archived",
             lambda: not list(bucket.list("incoming/")) and
             len(list(bucket.list("archive/"))) == 2 * count)
    archived = sorted(item.key for item in bucket.list("archive/"))

    result = datastore("status", "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert prefix_objects(result.stdout, "incoming/") == 0
    assert prefix_objects(result.stdout, "failed/") == 0
    assert prefix_objects(result.stdout, "archive/") == 2 * count
    for table, rows in expected.items():
        assert status_rows(result.stdout, table, day.isoformat()) == rows
    assert status_rows(result.stdout, "stations", day.isoformat()) == 1
    # The functions' counters, read from the metrics endpoints the stack publishes.
    assert set(info.metrics) == {"upload", "writer"}
    assert "Counters since the functions started" in result.stdout
    assert f"100 x{2 * count}" in result.stdout

    # Ctrl-C: everything stops, nothing is left running.
    children = info.children
    assert set(children) == {"seaweedfs", "upload", "writer"}
    before = process_groups()
    assert all(before.get(pid) for pid in children.values())
    output = stack.stop()
    assert "local stack stopped" in output
    after = process_groups()
    assert not [pid for group in children.values() for pid in after.get(group, [])]
    assert not local.StackFiles.at(state).info.exists()

    # Second run on the same state dir: without the webhook, the sweep delivers.
    stack = Stack(state, tmp_path, "--no-webhook", "--sleep", "0.5")
    stacks.append(stack)
    assert stack.info.demo_stations() == demo  # the same numbers and passwords
    bucket = stack.bucket()
    assert sorted(item.key for item in bucket.list("archive/")) == archived
    again = read_station(day_file, "Amsterdam", 501)
    assert again is not None
    for table in expected:
        assert (again[table] == content[table]).all()

    # Three distinct stations, each with its own password and events.
    late_start = dt.datetime(2024, 3, 6, 0, 30, 0)
    result = datastore(
        "simulate", "--state-dir", str(state), "--stations", "3", "--seed", "3", "--start",
        late_start.isoformat(), "--batches", "1", "--batch-size", "25", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as stations 501-503" in result.stdout
    assert re.search(r"answers\s+100 \(stored\) x3$", result.stdout, re.MULTILINE)
    next_day = Path(stack.info.data_dir) / "2024" / "3" / "2024_3_6.h5"
    for number in (501, 502, 503):
        late = table_counts(expected_batches(3, late_start, 25, 1, station=number))
        wait_for(f"station {number}'s upload in HDF5",
                 lambda number=number, late=late:
                 (c := read_station(next_day, "Amsterdam", number))
                 and all(len(c.get(t, ())) == n for t, n in late.items()))
    late_events = sum(table_counts(expected_batches(3, late_start, 25, 1, station=n))["events"]
                      for n in (501, 502, 503))
    wait_for("the new uploads archived",
             lambda: len(list(bucket.list("archive/"))) == 2 * count + 3)
    unchanged = read_station(day_file, "Amsterdam", 501)
    assert unchanged is not None
    assert all(len(unchanged[t]) == n for t, n in expected.items())

    result = datastore("status", "--state-dir", str(state), cwd=tmp_path)
    assert status_rows(result.stdout, "stations", "2024-03-06") == 3
    assert status_rows(result.stdout, "events", "2024-03-06") == late_events
    assert status_rows(result.stdout, "events", "2024-03-05") == expected["events"]

    # kill -9 leaves the children running; the next start stops them and takes over.
    children = stack.info.children
    stack.kill()
    assert all(process_groups().get(pid) for pid in children.values())
    stack = Stack(state, tmp_path, "--no-webhook")
    stacks.append(stack)
    assert "stopped what a killed run left behind" in stack.output.read_text()
    after = process_groups()
    assert not [pid for group in children.values() for pid in after.get(group, [])]
    assert len(list(stack.bucket().list("archive/"))) == 2 * count + 3

    children = stack.info.children
    stack.stop()
    after = process_groups()
    assert not [pid for group in children.values() for pid in after.get(group, [])]
