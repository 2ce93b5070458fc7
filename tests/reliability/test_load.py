"""Load against real processes: a uvicorn API (`lorp serve --no-worker`) on Postgres and a private Redis.

- 50 clients post the same body with the same Idempotency-Key at once: one job row, one job id.
- Status polling: ``GET /v1/jobs/{id}`` at 100 concurrent clients for a bounded time, beside
  ``/healthz`` of the same app in the same run: p50, p99, req/s, and the ratio.

Run: ``.venv/bin/python -m pytest tests/reliability/test_load.py -m reliability``
(``LORP_LOAD_POLL_S`` sets each polling phase). Batches of queued jobs through the service are
tests/reliability/test_soak.py.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text

from tests.service.conftest import create_test_database, drop_test_database

from .record import record
from .servers import (
    Processes,
    RedisServer,
    build_tiny_model,
    cheap_job,
    service_env,
    start_api,
    upload_corpus,
)

pytestmark = pytest.mark.reliability

COMMAND = ".venv/bin/python -m pytest tests/reliability/test_load.py -m reliability -k {k}"
POLL_S = float(os.environ.get("LORP_LOAD_POLL_S", "8"))
IDEMPOTENT_CLIENTS = 50
POLL_CLIENTS = 100


@dataclass
class Stack:
    base: str
    env: dict[str, str]
    engine: Engine
    procs: Processes
    model: Path
    dataset: str
    data_dir: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("load")
    model_root = tmp / "models"
    model = build_tiny_model(model_root, tiny_tokenizer, layers=2)
    redis = RedisServer(tmp / "redis")
    redis.start()
    db_url = create_test_database("lorp_rel_load")
    procs = Processes(tmp / "logs")
    engine = create_engine(db_url)
    try:
        env = service_env(tmp / "data", model_root, database_url=db_url, broker_url=redis.url)
        base = start_api(procs, env)
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
            dataset = upload_corpus(client)
        yield Stack(base, env, engine, procs, model, dataset, tmp / "data")
    finally:
        procs.stop()
        engine.dispose()
        redis.stop()
        drop_test_database(db_url)


# -- idempotency -------------------------------------------------------------------------------------------


def test_50_clients_same_idempotency_key_make_one_job(stack: Stack) -> None:
    key = f"load-{uuid.uuid4().hex}"
    body = cheap_job(stack.model, stack.dataset, seed=424242)
    barrier = threading.Barrier(IDEMPOTENT_CLIENTS, timeout=60)
    results: list[tuple[int, str | None, float]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=stack.base, timeout=60, trust_env=False) as http:
            barrier.wait()
            started = time.monotonic()
            resp = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
            took = time.monotonic() - started
            job_id = resp.json().get("id") if resp.status_code in (200, 202) else resp.text[:200]
            with lock:
                results.append((resp.status_code, job_id, took))

    threads = [threading.Thread(target=client) for _ in range(IDEMPOTENT_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    with stack.engine.connect() as conn:
        rows = conn.execute(text("select id::text from jobs where idempotency_key = :k"), {"k": key}).scalars().all()
    statuses = Counter(s for s, _, _ in results)
    ids = {j for _, j, _ in results}
    latencies = sorted(t for *_, t in results)
    # Leave no queued job behind.
    if rows:
        httpx.post(f"{stack.base}/v1/jobs/{rows[0]}/cancel", timeout=30, trust_env=False)
    record(
        "load",
        f"{IDEMPOTENT_CLIENTS} clients, same Idempotency-Key at once",
        runs=1,
        outcomes={
            "responses": len(results),
            "statuses": dict(sorted(statuses.items())),
            "distinct job ids in responses": len(ids),
            "job rows with the key": len(rows),
        },
        data_lost=0,
        command=COMMAND.format(k="idempotency"),
        notes="50 threads released by a barrier; one 202 creates the job, the other 49 replay it (200).",
        figures={
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_max_s": round(latencies[-1], 3) if latencies else None,
        },
    )
    assert len(results) == IDEMPOTENT_CLIENTS
    assert statuses == {202: 1, 200: IDEMPOTENT_CLIENTS - 1}, statuses
    assert len(rows) == 1 and ids == set(rows), (ids, rows)


# -- status polling ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    path: str
    latencies: list[float]
    errors: Counter[str]
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]


class _Connection:
    """One keep-alive HTTP/1.1 connection, as lean as a client can be, so the server is what is measured.

    (httpx's async pool spent more CPU per request than the API did, on the same 2 cores.)
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base: str) -> _Connection:
        host, _, port = base.removeprefix("http://").partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def get(self, path: str) -> int:
        """Send GET ``path``, read the whole response; returns its status code."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        length = {k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-length")
        if length is None:
            raise ConnectionError("a response without Content-Length")
        await self.reader.readexactly(int(length))
        return status

    def close(self) -> None:
        self.writer.close()


async def _hammer(base: str, path: str, clients: int, seconds: float) -> Phase:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    # Open the connections before the clock starts.
    connections = await asyncio.gather(*(_Connection.open(base) for _ in range(clients)))
    await asyncio.gather(*(conn.get("/healthz") for conn in connections))
    deadline = time.monotonic() + seconds

    async def one(conn: _Connection) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status = await asyncio.wait_for(conn.get(path), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                errors[type(exc).__name__] += 1
                return  # the connection's state is unknown: stop this client
            if status != 200:
                errors[str(status)] += 1
                continue
            latencies.append(time.monotonic() - started)

    began = time.monotonic()
    try:
        await asyncio.gather(*(one(conn) for conn in connections))
    finally:
        for conn in connections:
            conn.close()
    elapsed = time.monotonic() - began
    return Phase(path, latencies, errors, elapsed)


def test_status_polling_latency_at_100_clients(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base, timeout=30, trust_env=False) as client:
        page = client.get("/v1/jobs", params={"status": "succeeded", "limit": 1}).json()["items"]
        if not page:
            page = client.get("/v1/jobs", params={"limit": 1}).json()["items"]
        if not page:
            page = [client.post("/v1/jobs", json=cheap_job(stack.model, stack.dataset, seed=999)).json()]
        job = page[0]
    job_path = f"/v1/jobs/{job['id']}"
    status = asyncio.run(_hammer(stack.base, job_path, POLL_CLIENTS, POLL_S))
    trivial = asyncio.run(_hammer(stack.base, "/healthz", POLL_CLIENTS, POLL_S))
    ratio = status.rate / trivial.rate if trivial.rate else None
    figures: dict[str, Any] = {"clients": POLL_CLIENTS, "seconds_per_endpoint": POLL_S}
    for name, phase in (("job", status), ("healthz", trivial)):
        figures[f"{name}_requests"] = len(phase.latencies)
        figures[f"{name}_p50_ms"] = round(phase.pct(0.50) * 1000, 1) if phase.latencies else None
        figures[f"{name}_p99_ms"] = round(phase.pct(0.99) * 1000, 1) if phase.latencies else None
        figures[f"{name}_req_per_s"] = round(phase.rate, 1)
    figures["job_vs_healthz_throughput"] = round(ratio, 3) if ratio else None
    record(
        "load",
        "Status polling at 100 concurrent clients",
        runs=len(status.latencies) + len(trivial.latencies),
        outcomes={
            "job status": job["status"],
            "errors GET /v1/jobs/{id}": dict(status.errors),
            "errors /healthz": dict(trivial.errors),
        },
        data_lost=0,
        command=COMMAND.format(k="polling"),
        notes=(
            "One uvicorn process (lorp serve --no-worker) on Postgres; 100 keep-alive connections from one "
            "asyncio client (raw HTTP/1.1, lighter than httpx, which was the bottleneck) on the same 2 cores. "
            "/healthz does no I/O, so the ratio is the cost of the database reads and the job view; "
            "scripts/bench_api.py gives the server-side cost per request alone."
        ),
        figures=figures,
    )
    assert not status.errors and not trivial.errors, (status.errors, trivial.errors)
    assert status.latencies and trivial.latencies
