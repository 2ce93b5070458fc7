"""`lorp serve` owns its worker: a signal to serve stops the worker too, and a killed serve takes it along,
even in the middle of a job that would never end; and the worker's pool children come from a
single-threaded fork server, never from the worker's threaded main process.

Real processes: `lorp serve` in the embedded mode (API, Celery worker, reconciler) on a free port.
"""

from __future__ import annotations

import json
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
from tiny import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
LORP = str(Path(sys.executable).with_name("lorp"))


def start_serve(tmp_path: Path, **settings: str) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """`lorp serve` up and ready, and its descendants once the worker's pool child exists."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["LORP_DATA_DIR"] = str(tmp_path / "data")
    env.update({f"LORP_{name.upper()}": value for name, value in settings.items()})
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
        if ready and pool_processes(children):
            proc.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
            return proc, children
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"lorp serve did not come up with its worker:\n{(tmp_path / 'serve.log').read_text()}")


def pool_processes(tree: list[psutil.Process]) -> list[psutil.Process]:
    """The worker's pool processes in a process tree: each one's parent (its reaper) was forked by the
    fork server, which the Celery main process started."""
    servers = {p.pid for p in tree if "billiard.forkserver" in " ".join(_cmdline(p))}
    found = []
    for p in tree:
        try:
            reaper = p.parent()
            if reaper is not None and reaper.ppid() in servers:
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _registered(proc: subprocess.Popen[bytes]) -> bool:
    """Whether serve's worker has registered, its device listed by /readyz."""
    ready = httpx.get(f"{proc.base_url}/readyz", timeout=5)  # type: ignore[attr-defined]
    return bool(ready.json()["checks"]["workers"].get("devices"))


def _maps_torch(process: psutil.Process) -> bool:
    return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()


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


def test_a_signal_to_serve_stops_its_worker(tmp_path: Path) -> None:
    # SIGTERM: what a process manager sends. uvicorn takes SIGINT (Ctrl-C) the same way, into the same
    # shutdown, so one signal covers both.
    signum = signal.SIGTERM
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


def _threads(process: psutil.Process) -> int:
    return len(os.listdir(f"/proc/{process.pid}/task"))


def test_pool_children_come_from_a_single_threaded_fork_server_and_go_with_serve(tmp_path: Path) -> None:
    """No pool child is forked by a process with threads: the Celery main process runs several (the
    liveness beat; billiard's supervisor, task and result threads beside the SQLite broker's loop), so
    each child is forked by the fork server, which runs one. A child killed is reported with its real
    status (128 + 9), not the 255 billiard's own fork server gives every child. And a kill -9 of serve
    takes every one of those processes along."""
    proc, children = start_serve(tmp_path)
    try:
        (child,) = pool_processes(children)
        reaper = child.parent()
        server = reaper.parent()
        main = server.parent()
        assert "billiard.forkserver" in " ".join(server.cmdline())
        assert "celery" in " ".join(main.cmdline()) and main.ppid() == proc.pid
        assert _threads(main) > 1, "the main process is expected to run threads (else this test shows nothing)"
        assert _threads(server) == 1, f"the fork server runs {_threads(server)} threads"
        assert _threads(reaper) == 1
        # The main process runs no job: once it has registered (its device described, lorp.host), it
        # has loaded no torch, whose libraries the fork server alone maps.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _registered(proc):
            time.sleep(0.2)
        assert _registered(proc), (tmp_path / "serve.log").read_text()
        assert not _maps_torch(main), "the Celery main process loaded torch"
        assert _maps_torch(server)

        child.kill()
        log_path = tmp_path / "serve.log"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "exited with" not in log_path.read_text():
            time.sleep(0.2)
        log = log_path.read_text()
        assert f"pid:{child.pid} exited with 'exitcode 137'" in log, log[-3000:]
        assert "exitcode 255" not in log
        # The pool replaces the child, from the same fork server.
        deadline = time.monotonic() + 30
        fresh: list[psutil.Process] = []
        while time.monotonic() < deadline and not fresh:
            fresh = [p for p in pool_processes(psutil.Process(proc.pid).children(recursive=True)) if p.pid != child.pid]
            time.sleep(0.2)
        assert fresh and fresh[0].parent().ppid() == server.pid

        tree = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        proc.wait(timeout=10)
        alive = wait_gone(tree, timeout=60)
        assert not alive, f"orphaned by kill -9 of lorp serve: {[_cmdline(p) for p in alive]}"
    finally:
        for p in children:
            if not gone(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()


def _hanging_dataset(base: str, data_dir: Path) -> str:
    """An uploaded dataset whose stored file is then swapped for a FIFO nobody writes: a job that reads
    it (the worker copies it into its work folder first) blocks in the kernel for ever."""
    text = " ".join(f"the block {i} keeps the signal of layer {i % 7}." for i in range(400)).encode()
    uploaded = httpx.post(f"{base}/v1/datasets", files={"file": ("corpus.txt", text, "text/plain")}, timeout=30)
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    (stored,) = (data_dir / "artifacts" / "datasets" / dataset_id).iterdir()
    stored.unlink()
    os.mkfifo(stored)
    return dataset_id


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM, then kill -9 3 s later"])
def test_serve_killed_mid_job_takes_every_worker_process_along(tmp_path: Path, tiny_tokenizer, how: str) -> None:
    """A job that never ends runs (its input is a read that never returns); serve dies outright, or while
    its warm shutdown waits for that job: the worker, its fork server, reapers and pool children all go
    within seconds, none waits for the job."""
    root = tmp_path / "models"
    model = save_tiny_llama(root, "tiny", tiny_tokenizer, num_hidden_layers=2)
    proc, _ = start_serve(tmp_path, model_roots=json.dumps([str(root)]), heartbeat_interval_s="0.5")
    children: list[psutil.Process] = []
    try:
        base = proc.base_url  # type: ignore[attr-defined]
        body = {
            "model": {"id": str(model)},
            "method": "reverse",
            "target": {"num_layers": 1},
            "calibration": {"dataset": _hanging_dataset(base, tmp_path / "data"), "num_samples": 2, "seq_len": 16},
            "options": {"protected_layers": []},
            "evaluation": {"perplexity": False, "speed": False, "prompts": [], "curve_budgets": []},
        }
        posted = httpx.post(f"{base}/v1/jobs", json=body, timeout=30)
        assert posted.status_code == 202, posted.text
        job_url = f"{base}/v1/jobs/{posted.json()['id']}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and httpx.get(job_url, timeout=10).json()["status"] != "running":
            time.sleep(0.2)
        time.sleep(1)  # past the claim, into the read that never returns
        assert httpx.get(job_url, timeout=10).json()["status"] == "running"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert pool_processes(children), [c.cmdline() for c in children]
        if how == "kill -9":
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            assert proc.poll() is None, "serve was expected to wait for its worker's warm shutdown"
            proc.kill()
        proc.wait(timeout=10)
        alive = wait_gone(children, timeout=15)
        assert not alive, f"left running after {how} of lorp serve: {[_cmdline(p) for p in alive]}"
    finally:
        for p in children:
            if not gone(p):
                p.kill()
        if proc.poll() is None:
            proc.kill()
