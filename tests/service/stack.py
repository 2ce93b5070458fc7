"""Real service processes for the end-to-end tests: `lorp serve` embedded, or the full stack
(`lorp serve --no-worker` + `lorp worker` on Postgres, Redis and moto's S3 server), ready to use.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from ports import free_port
from tiny import save_tiny_llama

from .moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket

REPO = Path(__file__).resolve().parents[2]
LORP = str(Path(sys.executable).with_name("lorp"))
WORDS = "the model block layer state token depth phase cluster prune river city music science language".split()


class Processes:
    """Started subprocesses, stopped (SIGINT, then kill) at the end; their logs kept for failures."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def wait_ready(base: str, procs: Processes, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs.procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited early ({proc.returncode})\n{procs.logs()}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"service not ready\n{procs.logs()}")


def start_stack(
    mode: str, tmp_path: Path, procs: Processes, model_root: Path, request: pytest.FixtureRequest, **env_extra: str
) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env.update(
        LORP_DATA_DIR=str(tmp_path / "data"),
        LORP_MODEL_ROOTS=json.dumps([str(model_root)]),
        LORP_QUEUE_NAME=f"e2e-{uuid.uuid4().hex[:8]}",
        LORP_HEARTBEAT_INTERVAL_S="1",
        LORP_PROGRESS_MIN_INTERVAL_S="0.2",
        PYTHONUNBUFFERED="1",
        **env_extra,
    )
    info: dict[str, Any] = {"base": f"http://127.0.0.1:{port}", "mode": mode}
    if mode == "full":
        pg_url = request.getfixturevalue("pg_url")
        endpoint = request.getfixturevalue("s3_server")
        bucket = f"e2e-{uuid.uuid4().hex[:8]}"
        create_bucket(endpoint, bucket)
        env.update(
            LORP_DATABASE_URL=pg_url,
            LORP_BROKER_URL=request.getfixturevalue("redis_url"),
            LORP_STORAGE_URL=f"s3://{bucket}/artifacts",
            LORP_S3_ENDPOINT_URL=endpoint,
            LORP_S3_ACCESS_KEY=ACCESS_KEY,
            LORP_S3_SECRET_KEY=SECRET_KEY,
            LORP_S3_REGION=REGION,
        )
        info.update(pg_url=pg_url, endpoint=endpoint)
        procs.start("api", [LORP, "serve", "--no-worker", "--port", str(port)], env)
        procs.start("worker", [LORP, "worker", "--loglevel", "warning"], env)
    else:
        procs.start("serve", [LORP, "serve", "--port", str(port)], env)
    wait_ready(info["base"], procs)
    if env_extra.get("LORP_AUTH_REQUIRED") != "true":  # the catalogue's reader would need a key
        wait_for_catalogue(info["base"], procs)
    return info


def wait_for_catalogue(base: str, procs: Processes, timeout: float = 120) -> None:
    """A worker publishes the tasks it can run as it starts; jobs naming tasks wait for that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = httpx.get(f"{base}/v1/tasks", params={"source": "built-in"}, timeout=5).json()
        if listed["total"] and listed["published_at"]:
            return
        time.sleep(0.2)
    pytest.fail(f"no worker published its task catalogue\n{procs.logs()}")


def corpus() -> bytes:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(6000)).encode()


@contextmanager
def embedded_stack(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: Any, request: pytest.FixtureRequest, name: str, **env: str
) -> Iterator[dict[str, Any]]:
    """`lorp serve` on a tiny 4-block model for a whole module (``env``: more LORP_ settings): its info,
    ``model`` (the model's path), ``data`` (its data folder) and ``procs`` (the processes, for their logs)."""
    root = tmp_path_factory.mktemp(f"{name}-models")
    save_tiny_llama(root, "tiny", tokenizer, num_hidden_layers=4, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp(f"{name}-stack")
    procs = Processes(folder)
    try:
        info = start_stack("embedded", folder, procs, root, request, **env)
        yield {**info, "model": str(root / "tiny"), "data": folder / "data", "procs": procs}
    finally:
        procs.stop()
