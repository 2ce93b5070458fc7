"""`lorp serve` owns its worker: a signal to serve stops the worker too, and a killed serve takes it along.

Real processes: `lorp serve` in the embedded mode (API, Celery worker, reconciler) on a free port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from ports import free_port

REPO = Path(__file__).resolve().parents[2]
LORP = str(Path(sys.executable).with_name("lorp"))


def start_serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """`lorp serve` up and ready, and its descendants once the worker's pool child exists."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["LORP_DATA_DIR"] = str(tmp_path / "data")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [LORP, "serve", "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        # The Celery main process and its prefork child (one job slot).
        children = psutil.Process(proc.pid).children(recursive=True)
        if ready and len(children) >= 2:
            return proc, children
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"lorp serve did not come up with its worker:\n{(tmp_path / 'serve.log').read_text()}")


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited; only its parent's reaping is left
    except psutil.NoSuchProcess:
        return True


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in processes if not gone(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in processes if not gone(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_serve_stops_its_worker(tmp_path: Path, signum: int) -> None:
    proc, children = start_serve(tmp_path)
    try:
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
        alive = wait_gone(children, timeout=30)
        assert not alive, f"left running after {signal.Signals(signum).name}: {[p.cmdline() for p in alive]}"
    finally:
        for p in children:
            if not gone(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()


def test_a_killed_serve_takes_its_worker_along(tmp_path: Path) -> None:
    proc, children = start_serve(tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=10)
        alive = wait_gone(children, timeout=60)
        assert not alive, f"orphaned by kill -9 of lorp serve: {[p.cmdline() for p in alive]}"
    finally:
        for p in children:
            if not gone(p):
                p.kill()


def test_a_killed_worker_is_restarted(tmp_path: Path) -> None:
    """kill -9 of the worker and its pool child, as the out-of-memory killer would: serve starts another."""
    proc, children = start_serve(tmp_path)
    restarted: list[psutil.Process] = []
    try:
        for p in children:
            p.kill()
        assert not wait_gone(children, timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(restarted) < 2:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            restarted = [p for p in psutil.Process(proc.pid).children(recursive=True) if not gone(p)]
            time.sleep(0.3)
        log = (tmp_path / "serve.log").read_text()
        assert len(restarted) >= 2, log
        assert not {p.pid for p in restarted} & {p.pid for p in children}
        assert "restarting it in" in log and "worker restarted" in log, log
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log
        assert not wait_gone(restarted, timeout=30)  # the restarted worker is stopped with serve too
    finally:
        for p in [*children, *restarted]:
            if not gone(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()
