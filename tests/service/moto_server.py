"""moto's standalone S3 server on a free loopback port, for tests that talk S3 over real HTTP."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

HOST = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _answers(url: str, timeout: float) -> bool:
    # An explicit empty ProxyHandler: an HTTP(S)_PROXY in the environment must not swallow loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url + "/", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (OSError, urllib.error.URLError):
        return False


class MotoServer:
    """A `python -m moto.server` subprocess bound to 127.0.0.1 on a free port."""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @property
    def endpoint_url(self) -> str:
        """The server's base URL, e.g. http://127.0.0.1:54321."""
        if self.port is None:
            raise RuntimeError("moto server is not running")
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> str:
        """Start the server and wait until it answers HTTP; returns the endpoint URL."""
        last_log = ""
        for _ in range(attempts):
            # The port is picked, released, then bound by the child: another process may win the race,
            # in which case the child exits and we try a new port.
            port = free_port(self.host)
            fd, log_name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
            os.close(fd)
            self._log_path = Path(log_name)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with self._log_path.open("wb") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            self.port = port
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if _answers(self.endpoint_url, timeout=1.0):
                    return self.endpoint_url
                time.sleep(0.1)
            last_log = self._log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"moto server did not start on {self.host} after {attempts} attempts; log tail:\n{last_log}")

    def stop(self) -> None:
        """Stop the server (terminate, then kill if it lingers) and remove its log."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None
        self.port = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create a bucket on the server with the test credentials."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Session-wide moto S3 server on loopback; yields its endpoint URL."""
    with MotoServer() as server:
        yield server.endpoint_url
