"""The job request as clients send it (``POST /v1/jobs``), validated at the API and again in the worker.

Built from the engine's spec (``lorp.spec``, which imports only pydantic): the target and the
selection options are the engine's own models, every other bound is the engine's type, and the
field names are the same, so an engine error's field is the request's path. What the request adds
is what only a service has: references (an uploaded dataset id, an ``s3://`` model, the hub) that
the worker resolves into local sources, and the absence of the engine's operator-only knobs
(device, pickled weights, validation sizes). ``to_prune_spec`` turns a resolved request into the
engine's ``PruneSpec``.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.config import Settings
from app.core.errors import Unprocessable
from lorp.spec import (
    BatchSize,
    CalibrationSpec,
    DownstreamFields,
    DType,
    EvaluationSpec,
    MaxWindows,
    Method,
    ModelSpec,
    NumSamples,
    PruneSpec,
    Revision,
    Seed,
    SelectionOptions,
    SeqLen,
    TargetSpec,
)

BUILTIN = "builtin"
DEMO_MODEL = "demo"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_HUB_DATASET = re.compile(r"^hf:[A-Za-z0-9][A-Za-z0-9._/@:#\[\]-]{0,300}$")


class RequestError(Unprocessable):
    """A request that names something it may not use (422 ``invalid_request``); ``field`` is the JSON path."""

    code = "invalid_request"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(StrictModel):
    """Which model: ``demo``, a hub id, a local directory or ``.gguf`` file under the model roots, or ``s3://``."""

    id: str = Field(min_length=1, max_length=1024, examples=["demo", "Qwen/Qwen3-8B", "s3://models/llama-8b/"])
    revision: Revision | None = None
    trust_remote_code: bool = False

    @field_validator("id")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if any(ord(c) < 32 for c in value):
            raise ValueError("must not contain control characters")
        return value


class CalibrationRef(StrictModel):
    """Calibration text: the built-in corpus, an uploaded dataset id, or ``hf:DATASET[/CONFIG]:SPLIT#FIELD``."""

    dataset: str = Field(default=BUILTIN, max_length=512)
    num_samples: NumSamples = 64
    seq_len: SeqLen = 256
    seed: Seed = 0
    chat_template: bool = False
    batch_size: BatchSize = 4

    @field_validator("dataset")
    @classmethod
    def _dataset_reference(cls, value: str) -> str:
        if value == BUILTIN or _HUB_DATASET.match(value):
            return value
        try:
            uuid.UUID(value)
        except ValueError:
            raise ValueError(
                'must be "builtin", an uploaded dataset id, or "hf:DATASET[/CONFIG]:SPLIT#FIELD"'
            ) from None
        return value


class OptionsRef(SelectionOptions):
    """The engine's selection options, plus the dtype the worker loads the model in."""

    dtype: DType = "auto"


class EvaluationRef(DownstreamFields):
    """What to measure on the dense and pruned model: perplexity, speed, downstream tasks, completions."""

    perplexity: bool = True
    dataset: str | None = Field(default=None, max_length=512, description="default: built-in evaluation split")
    max_windows: MaxWindows = 32
    speed: bool = True

    @field_validator("dataset")
    @classmethod
    def _dataset_reference(cls, value: str | None) -> str | None:
        return None if value is None else CalibrationRef._dataset_reference(value)


class NotifySpec(StrictModel):
    """A webhook: on every final state the service POSTs the job to ``url``, signed with ``secret``."""

    url: str = Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s]+$", description="http(s) URL")
    secret: str = Field(min_length=16, max_length=256, description="the HMAC-SHA256 key; never shown again")


class JobCreate(StrictModel):
    """A pruning job request."""

    model: ModelRef
    method: Method = "auto"
    target: TargetSpec
    calibration: CalibrationRef = CalibrationRef()
    options: OptionsRef = OptionsRef()
    evaluation: EvaluationRef = EvaluationRef()
    notify: NotifySpec | None = Field(
        default=None, description="a webhook for the final state (hosts an operator allows: LORP_WEBHOOK_ALLOWED_HOSTS)"
    )

    def stored(self) -> dict[str, object]:
        """The request as the job row keeps it: without ``notify``, whose secret is kept apart and never echoed."""
        return self.model_dump(mode="json", exclude={"notify"})

    def fingerprint(self) -> str:
        """sha256 of the canonical request, for Idempotency-Key comparison."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def model_roots(settings: Settings) -> list[Path]:
    from lorp.assets.cache import cache_dir

    return [p.expanduser().resolve() for p in settings.model_roots] + [cache_dir().resolve()]


def local_model_path(value: str) -> Path:
    """The path a local model reference (``/abs``, ``./rel``, ``~/x``, ``file:...``, ``x.gguf``) names."""
    return Path(value.removeprefix("file://").removeprefix("file:")).expanduser().absolute()


def check_model_reference(ref: ModelRef, settings: Settings) -> str:
    """Classify the model reference and refuse what the settings do not allow; returns its kind.

    Kinds: ``demo``, ``hub``, ``local`` (directory or ``.gguf`` under a model root), ``s3`` (a prefix
    in the configured artifact bucket).
    """
    value = ref.id
    if ref.trust_remote_code and value not in settings.trust_remote_code_models:
        raise RequestError(
            f"trust_remote_code is not allowed for {value!r}; "
            "an operator must list it in LORP_TRUST_REMOTE_CODE_MODELS",
            "model.trust_remote_code",
        )
    if value == DEMO_MODEL:
        return "demo"
    if value.startswith("s3://"):
        bucket = value.removeprefix("s3://").split("/", 1)[0]
        store = settings.artifact_storage_url
        if not store.startswith("s3://") or store.removeprefix("s3://").split("/", 1)[0] != bucket:
            raise RequestError("s3:// models must live in the service's configured bucket", "model.id")
        if ".." in value.split("/"):
            raise RequestError("model.id must not contain '..' segments", "model.id")
        return "s3"
    if value.startswith(("file:", "/", ".", "~")) or value.endswith(".gguf"):
        roots = model_roots(settings)
        try:
            resolved = local_model_path(value).resolve()
        except (RuntimeError, OSError, ValueError) as exc:  # ~nosuchuser/..., a path the OS refuses
            raise RequestError(f"cannot resolve the local model path {value!r}: {exc}", "model.id") from None
        if not any(resolved.is_relative_to(root) for root in roots):
            raise RequestError(
                f"local model paths must lie inside the configured model roots ({', '.join(map(str, roots))})",
                "model.id",
            )
        return "local"
    if "://" in value:
        raise RequestError("URLs are not fetched; use a hub id, a path under a model root, or s3://", "model.id")
    if not _HUB_ID.match(value):
        raise RequestError("not a valid hub model id (ORG/NAME)", "model.id")
    if not settings.allow_hub_models:
        raise RequestError("hub models are disabled on this service (LORP_ALLOW_HUB_MODELS)", "model.id")
    return "hub"


def to_prune_spec(
    request: JobCreate,
    *,
    model_source: str,
    calibration_source: str,
    evaluation_source: str | None,
    device: str = "auto",
) -> PruneSpec:
    """The engine's spec for a request whose references the worker resolved to local sources."""
    calibration = request.calibration.model_dump(exclude={"dataset"})
    evaluation = request.evaluation.model_dump(exclude={"dataset"})
    return PruneSpec(
        model=ModelSpec(
            id=model_source,
            revision=request.model.revision,
            dtype=request.options.dtype,
            device=device,
            trust_remote_code=request.model.trust_remote_code,
        ),
        method=request.method,
        target=request.target,
        calibration=CalibrationSpec(dataset=calibration_source, **calibration),
        options=SelectionOptions.model_validate(request.options.model_dump(exclude={"dtype"})),
        evaluation=EvaluationSpec(dataset=evaluation_source, **evaluation),
    )


DatasetKind = Literal["builtin", "uploaded", "hub"]


def dataset_kind(reference: str) -> DatasetKind:
    if reference == BUILTIN:
        return "builtin"
    if reference.startswith("hf:"):
        return "hub"
    return "uploaded"


def host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in (e.lower().rstrip(".") for e in allowed):
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]):
            return True
    return False


def webhook_url_problem(url: str, allowed: list[str]) -> str | None:
    """Why a job's ``notify.url`` is refused, or None when it may be used: it must name a host an
    operator allows (``LORP_WEBHOOK_ALLOWED_HOSTS``: exact names, or ``*.example.com`` for subdomains);
    with none allowed, webhooks are off. Checked at submission, and again before each delivery."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"notify.url must be an http(s) URL with a host, not {url!r}"
    if parts.username or parts.password:
        return "notify.url must not carry credentials; the signature authenticates the service"
    if not allowed:
        return "webhooks are off on this service: an operator allows hosts with LORP_WEBHOOK_ALLOWED_HOSTS"
    if not host_allowed(parts.hostname, allowed):
        listed = ", ".join(allowed)
        return f"host {parts.hostname!r} is not one this service may call (LORP_WEBHOOK_ALLOWED_HOSTS: {listed})"
    return None
