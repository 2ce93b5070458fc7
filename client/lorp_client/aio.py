"""The asynchronous twin of ``lorp_client.client.Client``: the same methods, awaited (``list`` is an
async iterator)."""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from lorp_client import _core
from lorp_client.errors import ApiError, DownloadError, ServiceUnreachable, WaitTimeout
from lorp_client.models import (
    ArtifactOut,
    DatasetOut,
    DeliveryOut,
    EvalTasksOut,
    JobDeleted,
    JobListItem,
    JobOut,
    JobStatus,
    MethodsOut,
    Page,
)

log = logging.getLogger("lorp_client")


class AsyncClient:
    """The LoRP service over HTTP, for asyncio. Every method raises :class:`~lorp_client.errors.ApiError` for a 4xx/5xx
    answer, after retrying the ones that are safe to retry (connection errors, 429, 502-504; honouring
    ``Retry-After``) up to ``retries`` times. The service and key as :class:`~lorp_client.Client` finds them."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url, headers = _core.connection(base_url, api_key)
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- plumbing ------------------------------------------------------------------------------------

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise ServiceUnreachable(f"{method} {self._http.base_url}{url} failed: {exc}") from exc
                wait = _core.backoff_s(attempt, None)
                log.warning("%s %s failed (%s); retrying in %.1f s", method, url, exc, wait)
            else:
                if response.status_code not in _core.RETRY_STATUSES or attempt == self.retries:
                    return response
                wait = _core.backoff_s(attempt, response)
                log.warning("%s %s answered %d; retrying in %.1f s", method, url, response.status_code, wait)
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    # -- jobs ----------------------------------------------------------------------------------------

    async def submit(
        self, body: dict[str, Any] | None = None, *, idempotency_key: str | None = None, **fields: Any
    ) -> JobOut:
        """Submit a job: ``body`` is the request of ``POST /v1/jobs``; ``model=``, ``num_layers=``,
        ``ratio=``, ``max_perplexity_ratio=``, ``max_kl=``, ``dataset=``, ``selection_metric=``, ``heal=``,
        ``heal_steps=`` and ``method=`` fill it in, other keywords set whole sections (``options=``,
        ``evaluation=`` ...).
        An idempotency key is generated unless given, so a retried submission never creates a second job."""
        key = idempotency_key or _core.new_idempotency_key()
        payload = _core.job_body(body, fields)
        response = await self._request("POST", "/v1/jobs", json=payload, headers={"Idempotency-Key": key})
        return _core.parse(response, JobOut)

    async def get(self, job_id: Any) -> JobOut:
        return _core.parse(await self._request("GET", f"/v1/jobs/{job_id}"), JobOut)

    async def list(
        self, *, status: JobStatus | str | None = None, model: str | None = None, page_size: int = 50
    ) -> AsyncIterator[JobListItem]:
        """Every job (newest first) the key may see, fetching pages as the iteration goes."""
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = str(status)
        if model is not None:
            params["model"] = model
        while True:
            page = _core.parse(await self._request("GET", "/v1/jobs", params=params), Page[JobListItem])
            for item in page.items:
                yield item
            if not page.next_cursor:
                return
            params["cursor"] = page.next_cursor

    async def cancel(self, job_id: Any) -> JobOut:
        """Cancel a queued job at once, or ask a running one to stop (its view says cancel_requested_at)."""
        return _core.parse(await self._request("POST", f"/v1/jobs/{job_id}/cancel"), JobOut)

    async def wait(
        self,
        job_id: Any,
        *,
        timeout: float | None = None,
        on_progress: _core.ProgressCallback | None = None,
        poll_interval: float = 1.0,
        max_interval: float = 15.0,
    ) -> JobOut:
        """Poll until the job is succeeded, failed or cancelled, and return its last view.

        The interval grows (x1.5, at most ``max_interval``) while nothing changes and starts again at
        ``poll_interval`` when the job moves; ``on_progress(job)`` is called on each change. Raises
        :class:`WaitTimeout` after ``timeout`` seconds. A failed job is returned, not raised: read ``job.error``.
        """
        started = time.monotonic()
        interval, previous = poll_interval, None
        while True:
            job = await self.get(job_id)
            if _core.changed(previous, job):
                interval = poll_interval
                if on_progress is not None:
                    on_progress(job)
            else:
                interval = min(interval * 1.5, max_interval)
            if job.status.terminal:
                return job
            if timeout is not None and time.monotonic() - started + interval > timeout:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise WaitTimeout(job, timeout)
                interval = remaining
            previous = job
            await asyncio.sleep(interval)

    async def delete(self, job_id: Any) -> JobDeleted:
        """Delete a job (cancelled first if it runs): its files and results go, an analysis other jobs use stays."""
        return _core.parse(await self._request("DELETE", f"/v1/jobs/{job_id}"), JobDeleted)

    async def deliveries(self, job_id: Any) -> builtins.list[DeliveryOut]:
        """Every attempt at delivering the job's webhook, in order."""
        response = await self._request("GET", f"/v1/jobs/{job_id}/deliveries")
        if response.status_code >= 400:
            raise _core.api_error(response)
        return [DeliveryOut.model_validate(d) for d in response.json()]

    # -- the service ---------------------------------------------------------------------------------

    async def ready(self) -> dict[str, Any]:
        """The readiness checks (database, broker, storage, workers); ApiError 503 naming what is not ready."""
        response = await self._http.get("/readyz")
        if response.status_code >= 400:
            raise _core.api_error(response)
        checks: dict[str, Any] = response.json()["checks"]
        return checks

    async def methods(self) -> MethodsOut:
        """The pruning methods a job's ``method`` may name, what each does and which auto and the curve use."""
        return _core.parse(await self._request("GET", "/v1/methods"), MethodsOut)

    async def tasks(self, *, source: str | None = None, prefix: str | None = None, limit: int = 100) -> EvalTasksOut:
        """The downstream tasks the workers published (``evaluation.tasks`` may name them)."""
        params = {k: v for k, v in (("source", source), ("prefix", prefix)) if v}
        return _core.parse(await self._request("GET", "/v1/tasks", params={**params, "limit": limit}), EvalTasksOut)

    # -- files ---------------------------------------------------------------------------------------

    async def artifacts(self, job_id: Any) -> builtins.list[ArtifactOut]:
        response = await self._request("GET", f"/v1/jobs/{job_id}/artifacts")
        if response.status_code >= 400:
            raise _core.api_error(response)
        return [ArtifactOut.model_validate(a) for a in response.json()]

    async def download(
        self, job_id: Any, dest: str | Path, *, on_progress: _core.DownloadCallback | None = None
    ) -> builtins.list[Path]:
        """Every artifact of a succeeded job under ``dest`` (the pruned model in ``dest/model``), each
        checked against its sha256. A file already there and intact is kept; a broken transfer resumes
        from where it stopped where the server allows it (S3's range reads), else starts again."""
        dest = Path(dest)
        paths = []
        for artifact in await self.artifacts(job_id):
            path = _core.target_path(dest, artifact)
            if not _core.already_there(path, artifact):
                path.parent.mkdir(parents=True, exist_ok=True)
                await self._fetch(artifact, path, on_progress)
            paths.append(path)
        return paths

    async def _fetch(self, artifact: ArtifactOut, path: Path, on_progress: _core.DownloadCallback | None) -> None:
        part = _core.part_path(path)
        for attempt in range(self.retries + 1):
            offset = _core.resume_from(part, artifact)
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                async with self._http.stream("GET", artifact.url, headers=headers, follow_redirects=True) as response:
                    if response.status_code == 416:  # the partial file is no prefix the server knows
                        part.unlink(missing_ok=True)
                        continue
                    if response.status_code >= 400:
                        raise _core.api_error(response, await response.aread())
                    resumed = response.status_code == 206 and offset > 0
                    done = offset if resumed else 0
                    with part.open("ab" if resumed else "wb") as f:
                        async for chunk in response.aiter_bytes(_core.CHUNK):
                            f.write(chunk)
                            done += len(chunk)
                            if on_progress is not None:
                                on_progress(artifact.name, done, artifact.size_bytes)
            except (httpx.TransportError, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in _core.RETRY_STATUSES:
                    raise
                log.warning("download of %s broke off (%s); attempt %d", artifact.name, exc, attempt + 1)
                await asyncio.sleep(_core.backoff_s(attempt, None, base=0.2))
                continue
            if _core.finish_part(part, path, artifact):
                return
            log.warning("download of %s did not match its sha256; downloading it again", artifact.name)
        raise DownloadError(f"could not download {artifact.name} intact after {self.retries + 1} attempts")

    # -- datasets ------------------------------------------------------------------------------------

    async def upload_dataset(
        self, data: str | Path | bytes, *, name: str | None = None, text_field: str | None = None
    ) -> DatasetOut:
        """Upload a calibration text (``.txt`` or ``.jsonl``); use ``dataset.reference`` in a job."""
        if isinstance(data, bytes):
            content, filename = data, "dataset.jsonl" if text_field else "dataset.txt"
        else:
            content, filename = Path(data).read_bytes(), Path(data).name
        form = _core.dataset_form(name, text_field)
        files = {"file": (filename, content, "application/octet-stream")}
        return _core.parse(await self._request("POST", "/v1/datasets", files=files, data=form), DatasetOut)
