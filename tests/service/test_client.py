"""The Python client (client/lorp_client) against the real API: `lorp serve` embedded, and the full stack.

Submit (with a generated idempotency key), wait with progress, list across pages, cancel, errors as
exceptions carrying the problem's code and field, downloads checked against sha256 that survive a
connection cut mid-file (a truncating proxy on loopback) and resume from a partial file where storage
serves ranges (S3), and the asyncio twin.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ports import shut
from tiny import save_tiny_llama

from lorp_client import ApiError, AsyncClient, Client, JobStatus, WaitTimeout
from lorp_client._core import job_body, retry_after

from .stack import Processes, corpus, embedded_stack, start_stack


def _cheap(model: str, dataset: str, seed: int = 0) -> dict[str, Any]:
    return {
        "model": model,
        "num_layers": 1,
        "method": "lorp",
        "dataset": dataset,
        "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 2, "seed": seed},
        "evaluation": {"max_windows": 1, "speed": False, "prompts": [], "curve_budgets": []},
    }


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    with embedded_stack(tmp_path_factory, tiny_tokenizer, request, "client") as stack:
        with Client(stack["base"]) as client:
            dataset = client.upload_dataset(corpus(), name="client-corpus").reference
        yield {**stack, "dataset": dataset}


@pytest.fixture(scope="module")
def finished_job(embedded: dict[str, Any]) -> dict[str, Any]:
    """One job submitted, waited for and downloaded through the client; what was seen on the way."""
    seen: list[tuple[str, str | None, float]] = []
    with Client(embedded["base"]) as client:
        job = client.submit(**_cheap(embedded["model"], embedded["dataset"]))
        assert job.status == JobStatus.queued
        final = client.wait(  # polled at least every 0.5 s: a tiny job runs for seconds, not minutes
            job.id,
            timeout=240,
            poll_interval=0.1,
            max_interval=0.5,
            on_progress=lambda j: seen.append((j.status, j.stage, j.progress)),
        )
    return {"job": final, "seen": seen}


def test_submit_and_wait_report_progress_to_success(finished_job: dict[str, Any], embedded: dict[str, Any]) -> None:
    job, seen = finished_job["job"], finished_job["seen"]
    assert job.status == JobStatus.succeeded, (job.error, embedded["procs"].logs())
    assert job.summary is not None and job.summary.pruned_layers and len(job.summary.pruned_layers) == 1
    assert "running" in {s for s, _, _ in seen} and seen[-1][0] == "succeeded"
    progress = [p for _, _, p in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert len({stage for _, stage, _ in seen}) >= 3  # each change reported once, the stages in between


def test_download_checks_every_file_and_keeps_intact_ones(
    finished_job: dict[str, Any], embedded: dict[str, Any], tmp_path: Path
) -> None:
    job = finished_job["job"]
    with Client(embedded["base"]) as client:
        artifacts = {a.name: a for a in client.artifacts(job.id)}
        progress: list[tuple[str, int, int]] = []
        paths = client.download(job.id, tmp_path / "out", on_progress=lambda *a: progress.append(a))
        assert sorted(str(p.relative_to(tmp_path / "out")) for p in paths) == sorted(artifacts)
        config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
        assert config["num_hidden_layers"] == 3
        done = {name: got for name, got, _ in progress}
        assert done == {name: a.size_bytes for name, a in artifacts.items()}
        # A second download keeps what is there and intact; a corrupted file is fetched again.
        weights = tmp_path / "out" / "model" / "model.safetensors"
        kept_at = weights.stat().st_mtime_ns
        (tmp_path / "out" / "report.json").write_text("{}")
        progress.clear()
        client.download(job.id, tmp_path / "out", on_progress=lambda *a: progress.append(a))
        assert weights.stat().st_mtime_ns == kept_at
        assert {name for name, _, _ in progress} == {"report.json"}
        assert (tmp_path / "out" / "report.json").read_text() != "{}"


def test_idempotent_submission_and_listing_across_pages(embedded: dict[str, Any], finished_job: dict[str, Any]) -> None:
    key = f"client-test-{uuid.uuid4()}"
    body = _cheap(embedded["model"], embedded["dataset"], seed=7)
    with Client(embedded["base"]) as client:
        first = client.submit(idempotency_key=key, **body)
        again = client.submit(idempotency_key=key, **body)
        assert again.id == first.id
        other = client.submit(**body)  # no key given: one is generated, so this is a new job
        assert other.id != first.id
        listed = [j.id for j in client.list(page_size=1)]
        assert len(listed) == len(set(listed)) >= 3
        assert {first.id, other.id, finished_job["job"].id} <= set(listed)
        assert all(j.status == JobStatus.succeeded for j in client.list(status="succeeded", page_size=2))
        for job_id in (first.id, other.id):
            client.wait(job_id, timeout=240, poll_interval=0.2)


def test_errors_carry_the_problem_code_and_field(embedded: dict[str, Any]) -> None:
    with Client(embedded["base"]) as client:
        with pytest.raises(ApiError) as bad:
            client.submit(model=embedded["model"], num_layers=0, dataset=embedded["dataset"])
        assert bad.value.status == 422 and bad.value.field == "target.num_layers", bad.value
        assert bad.value.code and "num_layers" in str(bad.value)
        missing = uuid.uuid4()
        with pytest.raises(ApiError) as gone:
            client.get(missing)
        assert gone.value.status == 404 and gone.value.code == "not_found" and gone.value.field == "job_id"


def test_cancel_and_a_wait_that_runs_out(embedded: dict[str, Any]) -> None:
    with Client(embedded["base"]) as client:
        job = client.submit(**{**_cheap(embedded["model"], embedded["dataset"], seed=11), "num_layers": 2})
        with pytest.raises(WaitTimeout) as waited:
            client.wait(job.id, timeout=0.01)
        assert waited.value.job.id == job.id and not waited.value.job.status.terminal
        cancelled = client.cancel(job.id)
        assert cancelled.status == JobStatus.cancelled or cancelled.cancel_requested_at is not None
        final = client.wait(job.id, timeout=240, poll_interval=0.2)
        assert final.status in (JobStatus.cancelled, JobStatus.succeeded)  # it may have finished first


def test_the_async_client_is_the_same_client(
    embedded: dict[str, Any], finished_job: dict[str, Any], tmp_path: Path
) -> None:
    async def run() -> tuple[Any, list[Any], list[Path]]:
        async with AsyncClient(embedded["base"]) as client:
            job = await client.get(finished_job["job"].id)
            listed = [j async for j in client.list(page_size=2)]
            fresh = await client.submit(**_cheap(embedded["model"], embedded["dataset"], seed=21))
            done = await client.wait(fresh.id, timeout=240, poll_interval=0.2)
            assert done.status == JobStatus.succeeded, done.error
            return job, listed, await client.download(done.id, tmp_path / "aio")

    job, listed, paths = asyncio.run(run())
    assert job.status == JobStatus.succeeded and job.id in {j.id for j in listed}
    assert (tmp_path / "aio" / "model" / "config.json") in paths


class CuttingProxy:
    """A loopback TCP proxy in front of the API that cuts the first response carrying ``needle`` after
    ``keep`` bytes (closing both sides), then relays everything whole."""

    def __init__(self, upstream: str, needle: bytes, keep: int = 4096) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.needle, self.keep = needle, keep
        self.cuts = 0
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = socket.create_connection(self.upstream)
        cut = threading.Event()

        def upstream_to_client() -> None:
            sent = 0
            try:
                while data := up.recv(65536):
                    if cut.is_set():
                        room = self.keep - sent
                        if room <= 0:
                            break
                        data = data[:room]
                    conn.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            finally:
                # The other thread is blocked in conn.recv: shut, not only closed (ports.shut).
                for s in (conn, up):
                    shut(s)

        threading.Thread(target=upstream_to_client, daemon=True).start()
        try:
            while data := conn.recv(65536):
                with self._lock:
                    if self.needle in data and self.cuts == 0:
                        self.cuts += 1
                        cut.set()
                up.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def test_a_download_cut_mid_file_is_retried_and_checked(
    finished_job: dict[str, Any], embedded: dict[str, Any], tmp_path: Path
) -> None:
    proxy = CuttingProxy(embedded["base"], needle=b"model.safetensors")
    try:
        with Client(proxy.url) as client:
            paths = client.download(finished_job["job"].id, tmp_path / "cut")
    finally:
        proxy.close()
    assert proxy.cuts == 1
    weights = tmp_path / "cut" / "model" / "model.safetensors"
    assert weights in paths and not (tmp_path / "cut" / "model" / "model.safetensors.part").exists()
    with Client(embedded["base"]) as client:
        expected = {a.name: a.sha256 for a in client.artifacts(finished_job["job"].id)}
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == expected["model/model.safetensors"]


def test_full_stack_downloads_follow_presigned_urls_and_resume(
    tmp_path: Path, tiny_tokenizer: Any, request: pytest.FixtureRequest
) -> None:
    root = tmp_path / "models"
    save_tiny_llama(root, "tiny", tiny_tokenizer, num_hidden_layers=4, max_position_embeddings=256)
    procs = Processes(tmp_path)
    try:
        stack = start_stack("full", tmp_path, procs, root, request)
        with Client(stack["base"]) as client:
            dataset = client.upload_dataset(corpus()).reference
            job = client.wait(client.submit(**_cheap(str(root / "tiny"), dataset)).id, timeout=240, poll_interval=0.2)
            assert job.status == JobStatus.succeeded, (job.error, procs.logs())
            weights = next(a for a in client.artifacts(job.id) if a.name == "model/model.safetensors")
            whole = client.download(job.id, tmp_path / "whole")
            data = (tmp_path / "whole" / "model" / "model.safetensors").read_bytes()
            # A partial file from an earlier, broken run: the client asks S3 for the rest only.
            part = tmp_path / "again" / "model" / "model.safetensors.part"
            part.parent.mkdir(parents=True)
            part.write_bytes(data[: len(data) // 2])
            first_seen: dict[str, int] = {}
            client.download(job.id, tmp_path / "again", on_progress=lambda n, got, _t: first_seen.setdefault(n, got))
    finally:
        procs.stop()
    assert len(whole) >= 5
    assert (tmp_path / "again" / "model" / "model.safetensors").read_bytes() == data
    assert first_seen["model/model.safetensors"] > len(data) // 2  # counted from the resumed offset
    assert weights.size_bytes == len(data)


def test_a_client_made_without_arguments_finds_the_service_and_key_as_lorp_jobs_does(
    embedded: dict[str, Any], finished_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client() and AsyncClient() read $LORP_URL and $LORP_API_KEY, as `lorp jobs` does; arguments win."""
    monkeypatch.setenv("LORP_URL", embedded["base"] + "/")
    monkeypatch.delenv("LORP_API_KEY", raising=False)
    with Client() as client:
        assert finished_job["job"].id in {job.id for job in client.list()}
        assert "authorization" not in client._http.headers
    monkeypatch.setenv("LORP_API_KEY", "lorp_from_the_environment")
    with Client() as client, Client("http://127.0.0.1:9", "lorp_given") as given:
        assert client._http.headers["authorization"] == "Bearer lorp_from_the_environment"
        assert str(client._http.base_url) == embedded["base"]
        assert given._http.headers["authorization"] == "Bearer lorp_given"
        assert str(given._http.base_url) == "http://127.0.0.1:9"

    async def through_async() -> tuple[str, str]:
        async with AsyncClient() as client:
            return str(client._http.base_url), client._http.headers["authorization"]

    assert asyncio.run(through_async()) == (embedded["base"], "Bearer lorp_from_the_environment")


def test_body_shortcuts_and_retry_after() -> None:
    body = job_body(
        {"options": {"heal": "linear"}},
        {"model": "demo", "ratio": 0.25, "dataset": "builtin", "calibration": {"seed": 3}},
    )
    assert body == {
        "options": {"heal": "linear"},
        "model": {"id": "demo"},
        "target": {"ratio": 0.25},
        "calibration": {"dataset": "builtin", "seed": 3},
    }
    kl = job_body({"options": {"heal": "linear"}}, {"model": "demo", "max_kl": 0.05, "selection_metric": "kl"})
    assert kl == {
        "options": {"heal": "linear", "selection_metric": "kl"},
        "model": {"id": "demo"},
        "target": {"max_kl": 0.05},
    }
    assert retry_after(httpx.Response(503, headers={"Retry-After": "7"})) == 7.0
    assert retry_after(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert retry_after(httpx.Response(503)) is None


def test_jobs_submit_sends_a_kl_target_and_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorp_client import cli as jobs_cli

    sent: list[Any] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(422, json={"code": "invalid_request", "detail": "seen", "field": "target"})

    transport = httpx.MockTransport(answer)
    monkeypatch.setattr(jobs_cli, "_client", lambda _args: Client("http://lorp.test", transport=transport))
    parser = argparse.ArgumentParser()
    jobs_cli.add_jobs_command(parser.add_subparsers(dest="command"))
    target = ["--max-kl", "0.05", "--selection-metric", "kl"]
    args = parser.parse_args(["jobs", "submit", "--model", "demo", *target, "--heal", "distill", "--heal-steps", "8"])
    assert jobs_cli.run(args) == 2
    options = {"selection_metric": "kl", "heal": "distill", "heal_steps": 8}
    assert sent == [{"model": {"id": "demo"}, "target": {"max_kl": 0.05}, "options": options}]


def test_readiness_and_the_task_catalogue(embedded: dict[str, Any]) -> None:
    with Client(embedded["base"]) as client:
        checks = client.ready()
        assert checks["database"]["ok"] and checks["workers"]["ok"] and any(checks["workers"]["live"].values())
        assert "lorp_cloze" in {t.name for t in client.tasks(source="built-in").tasks}
