"""Webhook receivers on loopback, real TCP servers that behave well or badly on purpose.

``Receiver(mode)`` listens on 127.0.0.1 (a free port), reads each request whole and keeps it, then:

- ``answer``: after ``delay`` seconds, answers ``statuses`` in turn (the last one repeats), each with
  ``body`` and a length;
- ``trickle``: sends a valid status line one byte every ``interval`` seconds (about 30 s in all);
- ``hang``: says nothing until the receiver is closed;
- ``huge``: answers 200 with a Content-Length of 200 MB and writes the body as fast as it is taken,
  counting the bytes it got out (``sent``) before the client went away;
- ``garbage``: answers something that is not HTTP.

``connections`` counts accepted connections (a refused address must leave it at 0); ``received``
holds (arrival time, headers, body) of every request read. With ``tls`` (a server context) it speaks
HTTPS and keeps the names clients asked for in ``sni``.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

HUGE_BYTES = 200 * 1024 * 1024
CHUNK = 1024 * 1024


class Receiver:
    def __init__(
        self,
        mode: str = "answer",
        *,
        statuses: tuple[int, ...] = (200,),
        body: bytes = b"ok",
        interval: float = 0.5,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.mode = mode
        self.delay = delay
        self.sni: list[str | None] = []
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.statuses = statuses
        self.body = body
        self.interval = interval
        self.connections = 0
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.sent = 0
        self.closed = threading.Event()
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer.connections += 1
                conn: socket.socket = self.request
                conn.settimeout(30)
                try:
                    if tls is not None:
                        conn = tls.wrap_socket(conn, server_side=True)
                    request = outer._read_request(conn)
                    if request is None:
                        return
                    outer._respond(conn)
                except OSError:  # ssl.SSLError too: a client that refused the certificate
                    pass  # the client went away (a deadline, or a body it would not read)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hooks/lorp", host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def _read_request(self, conn: socket.socket) -> tuple[dict[str, str], bytes] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        length = int(headers.get("Content-Length", "0"))
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        headers[":request-line"] = lines[0]
        with self._lock:
            self.received.append((time.time(), headers, rest))
        return headers, rest

    def _respond(self, conn: socket.socket) -> None:
        if self.mode == "answer":
            if self.closed.wait(self.delay):
                return
            with self._lock:
                n = len(self.received) - 1
            status = self.statuses[min(n, len(self.statuses) - 1)]
            head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(self.body)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + self.body)
        elif self.mode == "trickle":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: " + b"x" * 40 + b"\r\n\r\n":
                if self.closed.wait(self.interval):
                    return
                conn.sendall(bytes([byte]))
        elif self.mode == "hang":
            self.closed.wait(120)
        elif self.mode == "huge":
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE_BYTES}\r\n\r\n".encode())
            chunk = b"\0" * CHUNK
            while self.sent < HUGE_BYTES and not self.closed.is_set():
                taken = conn.send(chunk)  # what the kernel took, until the client closes
                with self._lock:
                    self.sent += taken
        elif self.mode == "garbage":
            conn.sendall(b"SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")
        else:
            raise ValueError(self.mode)

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
