"""A free TCP port on loopback, for the servers the tests start (API, S3, Redis, Postgres), and the end
of a socket the tests' relays hold."""

from __future__ import annotations

import contextlib
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; a race with another process is possible
    but the servers here fail loudly on a taken port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def shut(s: socket.socket) -> None:
    """Shut ``s`` down, then close it: a thread blocked in ``recv`` on it sees the end at once (a bare
    close sends no FIN, and the peer waits out its read timeout)."""
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
