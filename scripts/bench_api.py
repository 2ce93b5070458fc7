"""API benchmark: server-side latency of the polling endpoints, without a network or an HTTP client.

Requests go straight into the ASGI app (in this process, on a fresh migrated Postgres database), so
the figures are the app's own cost per request: routing, dependencies and their thread-pool hops,
the queries and the response model. Interleaved rounds, medians and 99th percentiles; the ratio to
``/healthz`` (no I/O) measured in the same run is the figure to compare across machines.

    python scripts/bench_api.py [--requests 300 --rounds 5]

Needs Postgres at LORP_TEST_PG_ADMIN_URL (as the tests do). The table goes into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchdoc import API_HEADING as HEADING
from benchdoc import replace_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def _call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    route, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": route,
        "raw_path": route.encode(),
        "query_string": query.encode(),
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "root_path": "",
    }
    delivered = False
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the app never waits for a disconnect on these routes
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def _finish(url: str, job_id: str) -> None:
    """Make ``job_id`` a succeeded job with an analysis, plans and metrics, as a worker leaves one."""
    import uuid

    from sqlalchemy import create_engine, update
    from sqlalchemy.orm import Session

    from app.db.models import Analysis, Job, JobStatus, Metric, Plan

    engine = create_engine(url)
    n = 30
    with Session(engine) as session:
        analysis = Analysis(
            fingerprint=uuid.uuid4().hex * 2,
            model_source="demo",
            model_revision=None,
            dataset_sha256="0" * 64,
            num_samples=32,
            seq_len=256,
            seed=0,
            num_tokens=8192,
            num_blocks=n,
            similarity=[[1.0] * (n + 1)] * (n + 1),
            angular_distance=[[0.0] * (n + 1)] * (n + 1),
            rls=0.4,
            k=4,
            clusters=[i * 4 // n for i in range(n)],
            redundancy=[0.5] * n,
            provenance={},
        )
        session.add(analysis)
        session.flush()
        jid = uuid.UUID(job_id)
        session.add_all(
            [Plan(job_id=jid, name=f"p{i}", k=4, pruned_layers=[i, i + 1], chosen=i == 0) for i in range(6)]
            + [Metric(job_id=jid, name=f"m{i}", phase=ph, value=1.0) for i in range(4) for ph in ("dense", "pruned")]
        )
        session.execute(
            update(Job)
            .where(Job.id == jid)
            .values(status=JobStatus.succeeded, analysis_id=analysis.id, chosen_method="p0", pruned_layers=[0, 1])
        )
        session.commit()
    engine.dispose()


async def _measure(app: Any, url: str, requests: int, rounds: int) -> dict[str, list[float]]:
    job = {"model": {"id": "demo"}, "target": {"num_layers": 2}}
    status, body = await _call(app, "POST", "/v1/jobs", json.dumps(job).encode())
    assert status == 202, body
    queued = json.loads(body)["id"]
    status, body = await _call(app, "POST", "/v1/jobs", json.dumps({**job, "method": "lorp"}).encode())
    done = json.loads(body)["id"]
    _finish(url, done)
    paths = {
        "/healthz": "/healthz",
        "GET /v1/jobs/{id} (queued)": f"/v1/jobs/{queued}",
        "GET /v1/jobs/{id} (succeeded, with summary)": f"/v1/jobs/{done}",
        "GET /v1/jobs?limit=20": "/v1/jobs?limit=20",
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    for path in paths.values():  # warm every route
        for _ in range(20):
            status, body = await _call(app, "GET", path)
            assert status == 200, (path, body[:200])
    for _ in range(rounds):
        for name, path in paths.items():
            for _ in range(requests // rounds):
                started = time.perf_counter()
                await _call(app, "GET", path)
                times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--requests", type=int, default=1000, help="per endpoint")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from tests.service.conftest import create_test_database, drop_test_database

    url = create_test_database("lorp_bench_api")
    try:
        with tempfile.TemporaryDirectory() as data:
            os.environ.update(LORP_DATABASE_URL=url, LORP_DATA_DIR=data, LORP_BROKER_URL="memory://")
            from app.core.config import Settings
            from app.main import create_app

            app = create_app(Settings())

            async def run() -> dict[str, list[float]]:
                async with app.router.lifespan_context(app):
                    return await _measure(app, url, args.requests, args.rounds)

            times = asyncio.run(run())
    finally:
        drop_test_database(url)

    base = statistics.median(times["/healthz"])
    rows = []
    for name, values in times.items():
        values.sort()
        p50, p99 = statistics.median(values), values[int(0.99 * (len(values) - 1))]
        rows.append(f"| {name} | {len(values)} | {p50 * 1000:.2f} | {p99 * 1000:.2f} | {p50 / base:.1f} |")
    section = [
        HEADING,
        "",
        f"Recorded {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python scripts/bench_api.py` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores: requests sent straight into the ASGI app "
        f"(no socket, no HTTP client), one at a time, {args.rounds} interleaved rounds; Postgres on loopback, "
        "no API keys.",
        "",
        "| endpoint | requests | p50, ms | p99, ms | p50 / healthz p50 |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        "A poll of a queued or running job is one query; a succeeded job's adds its plans and metrics. Most of",
        "the rest is FastAPI's thread-pool hops for the blocking dependencies (the session, the API key) and",
        "the route.",
        "",
    ]
    print("\n".join(section))
    replace_section(ROOT / args.out, HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
