"""Free loopback ports for the servers the tools start (S3 server, functions, relays)."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"
#: SeaweedFS opens a gRPC port beside each HTTP port, this much higher.
GRPC_OFFSET = 10000


class NoFreePort(RuntimeError):
    pass


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_pair(exclude: set[int] | None = None) -> int:
    """A free port ``p`` below 55535 whose ``p + 10000`` is free as well."""
    exclude = exclude or set()
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port >= 65535 - GRPC_OFFSET:
            port = 20000 + port % 30000
        candidates = {port, port + GRPC_OFFSET}
        if candidates & exclude:
            continue
        if port_is_free(port) and port_is_free(port + GRPC_OFFSET):
            return port
    raise NoFreePort("no free pair of loopback ports found")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
