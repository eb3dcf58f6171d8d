"""Served functions as child processes: start one, wait until it answers, stop its group.

``datastore local``, the HTTP tests and the benchmarks all run a function the way its
image does (``python -m hisparc_datastore.serve``, see :mod:`hisparc_datastore.serve`), so
what they measure and test is what is deployed.  Each child leads its own process group:
stopping the group stops gunicorn's workers too, even if the arbiter is killed first.

Only the standard library is used here, so ``datastore status`` and ``simulate`` (which
import :mod:`hisparc_datastore_dev.local`) do not need gunicorn.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hisparc_datastore_dev.ports import LOOPBACK, free_port

#: A hang guard for start-up (imports, configuration, gunicorn's fork), not a target.
READY_TIMEOUT = 120.0
#: SIGTERM gives gunicorn this long (its graceful_timeout is 30 s) before SIGKILL.
STOP_TIMEOUT = 30.0


class ServeError(RuntimeError):
    """A served function exited or never answered; the message names its log."""


@dataclass
class Served:
    """One function served by a child process in its own process group."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str | None = None  # the launcher's metrics endpoint, when it has one
    #: Served over HTTPS with this self-signed certificate, which clients trust.
    ca_file: Path | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_process(self.process, timeout)


def serve_command(source: Path | str, target: str, host: str, port: int) -> list[str]:
    """The command the images run (``CMD``), with this interpreter and an explicit address."""
    return [sys.executable, "-m", "hisparc_datastore.serve", "--source", str(source),
            "--target", target, "--host", host, "--port", str(port)]


def spawn(command: Sequence[str], env: Mapping[str, str], log_path: Path,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session (its own process group), output to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )


def start_function(source: Path | str, target: str, env: Mapping[str, str], log_path: Path,
                   *, name: str | None = None, port: int = 0, cwd: Path | None = None,
                   tls: tuple[Path, Path] | None = None) -> Served:
    """Serve ``target`` from ``source`` on loopback (``port`` 0: a free one); no waiting.

    Its metrics endpoint gets a free port too, unless ``env`` names one (``METRICS_PORT``;
    the launcher's default, 9464, would be taken by the second function on one machine).
    ``tls`` (certificate, key) serves HTTPS.
    """
    port = port or free_port()
    env = dict(env)
    if tls is not None:
        env["TLS_CERT_FILE"], env["TLS_KEY_FILE"] = str(tls[0]), str(tls[1])
    env.setdefault("METRICS_HOST", LOOPBACK)
    env.setdefault("METRICS_PORT", str(free_port()))
    metrics_url = (f"http://{LOOPBACK}:{env['METRICS_PORT']}/metrics"
                   if env["METRICS_PORT"] != "0" else None)
    process = spawn(serve_command(source, target, LOOPBACK, port), env, log_path, cwd)
    scheme = "http" if tls is None else "https"
    return Served(name or target, f"{scheme}://{LOOPBACK}:{port}/", port, process, log_path,
                  metrics_url, None if tls is None else tls[0])


def wait_until_serving(served: Served, timeout: float = READY_TIMEOUT,
                       cancel: threading.Event | None = None) -> None:
    """Return once the function answers anything over HTTP (or ``cancel`` is set).

    Raises :class:`ServeError` when the process exits first (its log says why, e.g. a
    configuration error) or nothing answers within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            return
        if not served.alive():
            raise ServeError(f"the {served.name} function exited with "
                             f"{served.process.returncode}; see {served.log_path}")
        try:
            context = (None if served.ca_file is None
                       else ssl.create_default_context(cafile=str(served.ca_file)))
            urllib.request.urlopen(served.url, timeout=5,  # noqa: S310 - our URL
                                   context=context).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    if cancel is None or not cancel.is_set():
        raise ServeError(f"the {served.name} function did not answer within {timeout:.0f} s; "
                         f"see {served.log_path}")


def serve_function(source: Path | str, target: str, env: Mapping[str, str], log_path: Path,
                   *, name: str | None = None, port: int = 0, cwd: Path | None = None,
                   timeout: float = READY_TIMEOUT, tls: tuple[Path, Path] | None = None
                   ) -> Served:
    """:func:`start_function` and :func:`wait_until_serving`; stopped again if it fails."""
    served = start_function(source, target, env, log_path, name=name, port=port, cwd=cwd,
                            tls=tls)
    try:
        wait_until_serving(served, timeout)
    except BaseException:
        served.stop()
        raise
    return served


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def stop_group(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the process group led by ``pid``: SIGTERM, and SIGKILL if that is not enough.

    Works for any group leader, not only our own children (``datastore local`` stops
    what a killed run left behind); a child of ours must still be reaped by the caller.
    """
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """Stop a child started by :func:`spawn` and its whole group, and reap it."""
    if process.poll() is None:
        stop_group(process.pid, timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
