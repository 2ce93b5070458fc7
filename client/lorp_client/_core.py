"""What the sync and async clients share: request bodies, response parsing, retry timing, file checks."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from lorp_client.errors import ApiError, DownloadError
from lorp_client.models import ArtifactOut, JobOut

M = TypeVar("M", bound=BaseModel)
ProgressCallback = Callable[[JobOut], None]
# (artifact name, bytes so far, total bytes)
DownloadCallback = Callable[[str, int, int], None]

RETRY_STATUSES = frozenset({429, 502, 503, 504})
CHUNK = 1024 * 1024
DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "LORP_URL", "LORP_API_KEY"


def connection(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The service's URL and the headers every request carries: each argument as given, else its
    environment variable (``LORP_URL``, ``LORP_API_KEY``), else the default (the loopback service
    ``lorp serve`` starts; no key)."""
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    key = api_key or os.environ.get(KEY_ENV)
    return url.rstrip("/"), {"Authorization": f"Bearer {key}"} if key else {}


def job_body(body: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    """The job request: ``body`` as given, with the shortcuts (``model``, ``num_layers``, ``ratio``,
    ``max_perplexity_ratio``, ``max_kl``, ``dataset``, ``selection_metric``, ``heal``, ``heal_steps``,
    ``method``) filled into their sections."""
    out: dict[str, Any] = json.loads(json.dumps(body or {}))
    if (model := fields.pop("model", None)) is not None:
        out["model"] = {"id": model} if isinstance(model, str) else model
    target = {}
    for key in ("num_layers", "ratio", "max_perplexity_ratio", "max_kl"):
        value = fields.pop(key, None)
        if value is not None:
            target[key] = value
    if target:
        out["target"] = {**out.get("target", {}), **target}
    if (dataset := fields.pop("dataset", None)) is not None:
        out["calibration"] = {**out.get("calibration", {}), "dataset": str(dataset)}
    for key in ("selection_metric", "heal", "heal_steps"):
        if (value := fields.pop(key, None)) is not None:
            out["options"] = {**out.get("options", {}), key: value}
    for key, value in fields.items():
        if value is None:
            continue
        # A section given both ways (dataset= and calibration={...}) is merged, the keyword's keys winning.
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def dataset_form(name: str | None, text_field: str | None) -> dict[str, str]:
    return {key: value for key, value in (("name", name), ("text_field", text_field)) if value}


def new_idempotency_key() -> str:
    return f"lorp-client-{uuid.uuid4()}"


def retry_after(response: httpx.Response) -> float | None:
    """Seconds the server asked to wait (``Retry-After``: seconds or an HTTP date), if it did."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


def api_error(response: httpx.Response, body: bytes | None = None) -> ApiError:
    raw = response.content if body is None else body
    try:
        problem = json.loads(raw)
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        text = raw.decode(errors="replace").strip()[:500]
        problem = {"code": "http_error", "detail": text or response.reason_phrase}
    return ApiError(response.status_code, problem, retry_after=retry_after(response))


def parse(response: httpx.Response, model: type[M]) -> M:
    if response.status_code >= 400:
        raise api_error(response)
    return model.model_validate_json(response.content)


def backoff_s(attempt: int, response: httpx.Response | None, base: float = 0.5, cap: float = 30.0) -> float:
    """How long to wait before try ``attempt + 1``: the server's Retry-After, else doubling from ``base``."""
    asked = retry_after(response) if response is not None else None
    return min(asked if asked is not None else base * 2**attempt, cap)


def changed(previous: JobOut | None, job: JobOut) -> bool:
    if previous is None:
        return True
    return (previous.status, previous.stage, previous.progress, previous.attempts) != (
        job.status,
        job.stage,
        job.progress,
        job.attempts,
    )


def target_path(dest: Path, artifact: ArtifactOut) -> Path:
    """Where an artifact goes under ``dest``; a name that would leave it is refused."""
    parts = PurePosixPath(artifact.name).parts
    if not parts or artifact.name.startswith("/") or any(p in ("..", "") or "\\" in p for p in parts):
        raise DownloadError(f"refusing artifact name {artifact.name!r}: it would leave {dest}")
    return dest.joinpath(*parts)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def already_there(path: Path, artifact: ArtifactOut) -> bool:
    return path.is_file() and path.stat().st_size == artifact.size_bytes and sha256_of(path) == artifact.sha256


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def resume_from(part: Path, artifact: ArtifactOut) -> int:
    """Bytes of ``part`` to keep: all of them when they can be the start of the file, else none."""
    if not part.exists():
        return 0
    size = part.stat().st_size
    if size > artifact.size_bytes or size == 0:
        part.unlink()
        return 0
    return size


def finish_part(part: Path, path: Path, artifact: ArtifactOut) -> bool:
    """Move a complete, intact ``part`` into place; a corrupt one is removed (False: download again)."""
    if part.stat().st_size == artifact.size_bytes and sha256_of(part) == artifact.sha256:
        part.replace(path)
        return True
    part.unlink()
    return False
