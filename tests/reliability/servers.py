"""Private Redis and Postgres instances, and the service's processes, for the outage and load suites.

The shared Postgres (5432) and Redis (6379) are never stopped: an outage is played on a private
server started here, on a free loopback port, with its files in a temporary folder. Every wait is
bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from glob import glob
from pathlib import Path
from typing import Any, TypeVar

import httpx
from ports import free_port, shut

REPO = Path(__file__).resolve().parents[2]
LORP = str(Path(sys.executable).with_name("lorp"))
HOST = "127.0.0.1"
WORDS = "the model block layer state token depth phase cluster prune river city music science language".split()

T = TypeVar("T")


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # a probe that fails is the same as "not yet"
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last error: {last_exc!r})")


# -- Redis -------------------------------------------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port, keeping nothing on disk: a restart loses every message."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 20) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        log = (self.folder / "redis.log").open("ab")
        argv = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.folder), "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.starts += 1
        wait_until(
            "private redis up", lambda: self.proc is not None and self.proc.poll() is None and self._pings(), timeout
        )

    def _pings(self) -> bool:
        import redis

        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        wait_until("private redis port closed", lambda: not port_open(self.port), 10)


# -- Postgres ----------------------------------------------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found (install postgresql)")
    return path


class PostgresServer:
    """A private cluster (initdb, trust auth) on a free loopback port; runs as ``postgres`` when we are root."""

    def __init__(self) -> None:
        # Not under pytest's base temp: another pytest session resets that folder to 0700, which would
        # lock the postgres user out of its own data directory in the middle of a run.
        self.folder = Path(tempfile.mkdtemp(prefix="lorp-rel-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/postgres"

    def _run(self, argv: Sequence[str], timeout: float = 60) -> None:
        argv = list(argv)
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{out}")

    def init(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            self.folder.chmod(0o700)
        self._run([_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={HOST} -c max_connections=200"
        self._run(
            [_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.folder / "pg.log"), "-w", "start"]
        )

    def stop(self, mode: str = "fast") -> None:
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def running(self) -> bool:
        return port_open(self.port)

    def remove(self) -> None:
        """Stop the server if it runs and delete its files."""
        if self.running():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def create_database(self, name: str = "lorp") -> str:
        """A new database, migrated to head; returns its URL."""
        from sqlalchemy import create_engine, text

        from app.db.migrate import upgrade_head

        admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = self.admin_url.rsplit("/", 1)[0] + f"/{name}"
        upgrade_head(url)
        return url


# -- the service's processes -------------------------------------------------------------------------------


class Processes:
    """Started subprocesses (each in its own session), stopped with SIGINT then SIGKILL; logs kept."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.log_dir.glob("*.log"))
        )

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early ({proc.returncode})\n{self.logs()}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# LORP_QUEUE_QUIET_S for the scenarios whose queued messages the reconciler must tell lost from waiting
# (30 s by default): a slot freed between two jobs here is taken again within about a second.
QUEUE_QUIET_S = 8


def service_env(
    data_dir: Path,
    model_root: Path,
    *,
    database_url: str,
    broker_url: str,
    **settings: str | float | int,
) -> dict[str, str]:
    """This process's environment without LORP_ variables, plus the service's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env.update(
        LORP_DATA_DIR=str(data_dir),
        LORP_DATABASE_URL=database_url,
        LORP_BROKER_URL=broker_url,
        LORP_STORAGE_URL=(data_dir / "artifacts").as_uri(),
        LORP_MODEL_ROOTS=json.dumps([str(model_root)]),
        LORP_QUEUE_NAME=f"rel-{uuid.uuid4().hex[:8]}",
        LORP_HEARTBEAT_INTERVAL_S="1",
        LORP_PROGRESS_MIN_INTERVAL_S="0.2",
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
    )
    for name, value in settings.items():
        env[f"LORP_{name.upper()}"] = str(value)
    return env


def start_api(procs: Processes, env: dict[str, str], name: str = "api") -> str:
    """``lorp serve --no-worker`` (API and its reconciler thread) on a free port; returns its base URL."""
    port = free_port()
    procs.start(name, [LORP, "serve", "--no-worker", "--port", str(port)], env)
    base = f"http://{HOST}:{port}"

    def up() -> bool:
        procs.check_alive()
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200

    wait_until("API up", up, 90, interval=0.3)
    return base


def start_worker(
    procs: Processes, env: dict[str, str], name: str = "worker", loglevel: str = "info"
) -> subprocess.Popen[bytes]:
    """A Celery worker process exactly as ``lorp worker`` runs it, with its own node name ``name@host``."""
    from app.core.config import Settings
    from worker.service_cli import worker_command

    argv = worker_command(Settings(queue_name=env["LORP_QUEUE_NAME"]), loglevel=loglevel)
    return procs.start(name, [*argv, "--hostname", f"{name}@%h"], env)


def build_tiny_model(root: Path, tokenizer: Any, *, layers: int = 2, name: str = "tiny") -> Path:
    """A randomly initialised Llama with ``layers`` blocks and the tiny tokenizer, saved under ``root/name``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = root / name
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus(words: int = 3000) -> bytes:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(words)).encode()


def upload_corpus(client: httpx.Client) -> str:
    resp = client.post("/v1/datasets", files={"file": ("corpus.txt", corpus(), "text/plain")})
    if resp.status_code != 201:
        raise RuntimeError(f"dataset upload failed: {resp.status_code} {resp.text}")
    return str(resp.json()["id"])


def cheap_job(model_dir: Path, dataset_id: str, *, seed: int = 0, num_samples: int = 2) -> dict[str, Any]:
    """The cheapest real job: reverse order, one block, two windows of 16 tokens, no evaluation.

    No block is protected, so a 2-block model has one to remove.
    """
    return {
        "model": {"id": str(model_dir)},
        "method": "reverse",
        "target": {"num_layers": 1},
        "calibration": {
            "dataset": dataset_id,
            "num_samples": num_samples,
            "seq_len": 16,
            "seed": seed,
            "batch_size": 2,
        },
        "options": {"protected_layers": []},
        "evaluation": {"perplexity": False, "speed": False, "max_windows": 1},
    }


FINAL = ("succeeded", "failed", "cancelled")


class TcpGate:
    """A loopback relay to a server that can be cut and opened again: a network outage between the
    service and a server that keeps its state. Cut, it shuts every open connection and refuses new
    ones (accepted, then shut at once); opened, it relays again."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cuts = 0
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.server = socket.create_server((HOST, 0))
        self.url = f"http://{HOST}:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, name="tcp-gate", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                if not self._open.is_set():
                    raise ConnectionRefusedError("the gate is cut")
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                shut(conn)
                continue
            with self._lock:
                self._sockets |= {conn, up}
            threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                shut(s)
                with self._lock:
                    self._sockets.discard(s)

    def cut(self) -> None:
        self._open.clear()
        self.cuts += 1
        with self._lock:
            cut, self._sockets = self._sockets, set()
        for s in cut:
            shut(s)

    def reopen(self) -> None:
        self._open.set()

    def close(self) -> None:
        self.server.close()
        self.cut()
