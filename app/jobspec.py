"""The job request as clients send it (``POST /v1/jobs``), validated at the API and again in the worker.

Built from the engine's spec (``lorp.spec``, which imports only pydantic): the target and the
selection options are the engine's own models, every other bound is the engine's type, and the
field names are the same, so an engine error's field is the request's path. What the request adds
is what only a service has: references (an uploaded dataset id, an ``s3://`` model, the hub) that
the worker resolves into local sources, and the absence of the engine's operator-only knobs
(device, pickled weights, validation sizes). What each reference is (a demo, hub, local or ``s3://``
model and the folders it must stay in; a built-in, hub or uploaded dataset) is decided once, by
``resolve_references``, for the API's checks and the worker alike; ``to_prune_spec`` turns a request
whose references the worker made local into the engine's ``PruneSpec``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from app.core import webhook_policy
from app.core.config import Settings
from app.core.errors import Unprocessable
from app.core.s3ref import S3Location, is_s3_url, parse_s3_location
from app.storage.keys import JOBS_PREFIX
from lorp.assets.packaged import DEMO_MODEL
from lorp.confine import confinement_problem
from lorp.spec import (
    CalibrationFields,
    CalibrationSpec,
    DType,
    EvaluationFields,
    EvaluationSpec,
    Method,
    ModelSpec,
    PruneSpec,
    Revision,
    SelectionOptions,
    StrictModel,
    TargetSpec,
)

BUILTIN = "builtin"
# Where app/services/datasets.py keeps uploads in the artifact store (beside JOBS_PREFIX's job outputs).
DATASETS_PREFIX = "datasets"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_HUB_DATASET = re.compile(r"^hf:[A-Za-z0-9][A-Za-z0-9._/@:#\[\]-]{0,300}$")
# "hf:" then "name", "owner/name" or "owner/name/config": each a hub name, never "." or ".." (never a path).
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}){0,2}$")


class RequestError(Unprocessable):
    """A request that names something it may not use (422 ``invalid_request``); ``field`` is the JSON path."""

    code = "invalid_request"

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, field=field)


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


class CalibrationRef(CalibrationFields):  # the sampling fields and their defaults are the engine's
    """Calibration text: the built-in corpus, an uploaded dataset id, or ``hf:DATASET[/CONFIG]:SPLIT#FIELD``."""

    dataset: str = Field(default=BUILTIN, max_length=512)

    @field_validator("dataset")
    @classmethod
    def _dataset_reference(cls, value: str) -> str:
        if _HUB_DATASET.match(value):
            if not _HUB_DATASET_ID.match(re.split(r"[@:#]", value[3:], maxsplit=1)[0]):
                raise ValueError('the hub dataset must be "name" or "owner/name" (then "/CONFIG" or "@REVISION")')
            return value
        if value == BUILTIN:
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


class EvaluationRef(EvaluationFields):  # the fields and their defaults are the engine's, but the dataset
    """What to measure on the dense and pruned model: perplexity, speed, downstream tasks, completions."""

    dataset: str | None = Field(default=None, max_length=512, description="default: built-in evaluation split")

    @field_validator("dataset")
    @classmethod
    def _dataset_reference(cls, value: str | None) -> str | None:
        return None if value is None else CalibrationRef._dataset_reference(value)


class NotifySpec(StrictModel):
    """A webhook: on every final state the service POSTs the job to ``url``, signed with ``secret``.

    The URL must read as one (no control or whitespace characters, an http(s) scheme, a valid host name
    or IP literal, a port, no credentials); which hosts, ports and addresses it may name is the
    operator's (``webhook_url_problem``)."""

    url: str = Field(
        min_length=8, max_length=2048, description="http(s) URL", examples=["https://ci.example.com/hooks/lorp"]
    )
    secret: str = Field(min_length=16, max_length=256, description="the HMAC-SHA256 key; never shown again")

    @field_validator("url")
    @classmethod
    def _a_url(cls, value: str) -> str:
        webhook_policy.parse_webhook_url(value)  # a WebhookURLError (ValueError): 422 naming notify.url
        return value

    @field_validator("secret")
    @classmethod
    def _no_control_chars(cls, value: str) -> str:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise ValueError("must not contain control characters")
        return value


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
    """The folders local models (and every file in them, links followed) must resolve into: the
    operator's ``LORP_MODEL_ROOTS`` and the engine's cache."""
    from lorp.assets.cache import cache_dir

    return [p.expanduser().resolve() for p in settings.model_roots] + [cache_dir().resolve()]


def local_model_path(value: str) -> Path:
    """The path a local model reference (``/abs``, ``./rel``, ``~/x``, ``file:...``, ``x.gguf``) names."""
    return Path(value.removeprefix("file://").removeprefix("file:")).expanduser().absolute()


ModelRefKind = Literal["demo", "hub", "local", "s3"]


def _unresolvable(value: str) -> RequestError:
    return RequestError(f"cannot resolve the local model path {value!r}", "model.id")


@dataclass(frozen=True)
class ModelLocation:
    """What a ``model.id`` names, read once: its kind, and where the model is (``path`` for a local
    directory or ``.gguf`` file, ``s3`` for an ``s3://`` folder; neither for the demo or a hub id).

    :meth:`parse` reads the form only; what the settings allow is :func:`check_model_reference`'s."""

    kind: ModelRefKind
    path: Path | None = None
    s3: S3Location | None = None

    @classmethod
    def parse(cls, value: str) -> ModelLocation:
        """The location ``value`` names; a :class:`RequestError` naming ``model.id`` when it names none."""
        if value == DEMO_MODEL:
            return cls("demo")
        if is_s3_url(value):
            try:
                return cls("s3", s3=parse_s3_location(value))
            except ValueError as exc:
                raise RequestError(f"not a usable s3:// model reference: {exc}", "model.id") from None
        if value.startswith(("file:", "/", ".", "~")) or value.endswith(".gguf"):
            try:
                return cls("local", path=local_model_path(value))
            except (RuntimeError, OSError, ValueError):  # ~nosuchuser/..., a path the OS refuses
                raise _unresolvable(value) from None
        if "://" in value:
            raise RequestError("URLs are not fetched; use a hub id, a path under a model root, or s3://", "model.id")
        if not _HUB_ID.match(value) or ".." in value or "--" in value:
            raise RequestError("not a valid hub model id (ORG/NAME)", "model.id")
        return cls("hub")


def _own_areas(settings: Settings) -> list[S3Location]:
    """Where the service keeps its tenants' files in S3 (job outputs, uploaded datasets): never a model."""
    try:
        store = parse_s3_location(settings.artifact_storage_url, whole_bucket=True)
    except ValueError:  # a local store (or no usable s3:// one): nothing of the service's lies in S3
        return []
    base = store.prefix
    return [S3Location(store.bucket, f"{base}/{area}" if base else area) for area in (JOBS_PREFIX, DATASETS_PREFIX)]


def _check_s3_model(folder: S3Location, settings: Settings) -> None:
    """Refuse an ``s3://`` model folder the operator does not allow (a 422 naming model.id).

    Allowed: a folder inside one of ``LORP_MODEL_S3_PREFIXES`` (none: s3:// models are off) that
    neither lies in nor holds the service's own job outputs and uploads, whatever the prefixes say."""
    if not settings.model_s3_prefixes:
        raise RequestError(
            "s3:// models are off on this service: an operator allows folders with LORP_MODEL_S3_PREFIXES",
            "model.id",
        )
    if any(folder.overlaps(own) for own in _own_areas(settings)):
        raise RequestError(
            "s3:// models may not lie in (or hold) the service's own job outputs and uploads", "model.id"
        )
    allowed = settings.model_s3_folders
    if not any(folder.within(prefix) for prefix in allowed):
        listed = ", ".join(prefix.url for prefix in allowed)
        raise RequestError(f"s3:// models must lie under a folder this service allows ({listed})", "model.id")


def _check_local_model(path: Path, value: str, settings: Settings) -> None:
    roots = model_roots(settings)
    try:
        resolved = path.resolve()
    except (RuntimeError, OSError, ValueError):  # a link loop, a path the OS refuses
        raise _unresolvable(value) from None
    if not any(resolved.is_relative_to(root) for root in roots):
        configured = ", ".join(map(str, settings.model_roots)) or "none configured"
        raise RequestError(
            f"local model paths must lie inside the configured model roots (LORP_MODEL_ROOTS: {configured})",
            "model.id",
        )
    # What the worker will read, checked here as far as this process can see the folder.
    problem = confinement_problem(path, roots)
    if problem is not None:
        raise RequestError(f"the local model {value!r} cannot be used: {problem}", "model.id")


def check_model_reference(ref: ModelRef, settings: Settings) -> ModelLocation:
    """The model reference's location (:meth:`ModelLocation.parse`), refused where the settings do not
    allow it: a hub id (only ever fetched through the hub's cache) unless LORP_ALLOW_HUB_MODELS, a local
    directory or ``.gguf`` unless every file of it resolves inside the model roots, an ``s3://`` folder
    unless under ``LORP_MODEL_S3_PREFIXES`` (see :func:`_check_s3_model`).
    """
    if ref.trust_remote_code and ref.id not in settings.trust_remote_code_models:
        raise RequestError(
            f"trust_remote_code is not allowed for {ref.id!r}; "
            "an operator must list it in LORP_TRUST_REMOTE_CODE_MODELS",
            "model.trust_remote_code",
        )
    location = ModelLocation.parse(ref.id)
    if location.s3 is not None:
        _check_s3_model(location.s3, settings)
    elif location.path is not None:
        _check_local_model(location.path, ref.id, settings)
    elif location.kind == "hub" and not settings.allow_hub_models:
        raise RequestError("hub models are disabled on this service (LORP_ALLOW_HUB_MODELS)", "model.id")
    return location


DatasetKind = Literal["builtin", "uploaded", "hub"]
# How the engine loads a model (``lorp.loading.ModelKind``): an s3:// model is loaded from its local copy.
LoadKind = Literal["demo", "hub", "local"]


def dataset_kind(reference: str) -> DatasetKind:
    """What a dataset reference (already in the request's grammar, ``CalibrationRef``) names: the
    built-in corpus, a hub dataset (``hf:...``) or an uploaded dataset's id."""
    if reference == BUILTIN:
        return "builtin"
    if reference.startswith("hf:"):
        return "hub"
    return "uploaded"


@dataclass(frozen=True)
class DatasetReference:
    """One dataset field of a request, read once: what the client wrote (``name``, which the report and
    messages show), the JSON path it came from (``field``, which its errors name) and its kind."""

    name: str
    field: str
    kind: DatasetKind

    @classmethod
    def read(cls, name: str, field: str) -> DatasetReference:
        return cls(name, field, dataset_kind(name))

    @property
    def upload_id(self) -> uuid.UUID | None:
        """The uploaded dataset's id, whose text must be fetched; None for the built-in corpus and a hub
        dataset, which the engine reads as they are written (its own grammar)."""
        return uuid.UUID(self.name) if self.kind == "uploaded" else None


@dataclass(frozen=True)
class JobReferences:
    """What a request's references are, decided once from the request and the settings
    (:func:`resolve_references`).

    ``model`` is where ``model_name`` (the client's ``model.id``) is, as the settings allowed it;
    ``model_roots`` the folders a local model (every file of it, links followed) must resolve into,
    None for the others: the demo and a hub model stay in their caches, and an ``s3://`` model in the
    folder the worker copies it into, which only the worker knows."""

    model_name: str
    model: ModelLocation
    model_roots: tuple[Path, ...] | None
    calibration: DatasetReference
    evaluation: DatasetReference | None

    @property
    def load_kind(self) -> LoadKind:
        """How the engine loads the model: the demo, a hub id, or a local copy (a local or ``s3://`` model)."""
        kind = self.model.kind
        if kind == "demo" or kind == "hub":
            return kind
        return "local"


def resolve_references(request: JobCreate, settings: Settings) -> JobReferences:
    """What each of ``request``'s references is, where the settings allow it: the model as
    :func:`check_model_reference` reads and checks it (a refusal is a :class:`RequestError` naming
    ``model.id`` or ``model.trust_remote_code``), with the roots a local model must stay in, and each
    dataset field's kind. Reads no database or store: whether an uploaded dataset exists, and what an
    ``s3://`` folder holds, are for the caller to find out."""
    location = check_model_reference(request.model, settings)
    evaluation = request.evaluation.dataset
    return JobReferences(
        model_name=request.model.id,
        model=location,
        model_roots=tuple(model_roots(settings)) if location.kind == "local" else None,
        calibration=DatasetReference.read(request.calibration.dataset, "calibration.dataset"),
        evaluation=None if evaluation is None else DatasetReference.read(evaluation, "evaluation.dataset"),
    )


def to_prune_spec(
    request: JobCreate,
    *,
    model_source: str,
    calibration_source: str,
    evaluation_source: str | None,
    device: str = "auto",
) -> PruneSpec:
    """The engine's spec for a request whose references the worker made local: ``model_source`` and the
    dataset sources are what the engine reads in place of the request's model id and datasets."""
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


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether LORP_WEBHOOK_ALLOWED_HOSTS allows ``url``'s host and port (``host`` allows the scheme's
    default port only, ``host:8443`` that port, ``host:*`` any; ``*.example.com`` its subdomains)."""
    try:
        return webhook_policy.host_allowed(webhook_policy.parse_webhook_url(url), allowed)
    except ValueError:
        return False


def webhook_url_problem(url: str, allowed: list[str], allowed_networks: list[str] | None = None) -> str | None:
    """Why a job's ``notify.url`` is refused, or None when it may be used: it must be a URL
    (``NotifySpec``), name a host and port an operator allows (``LORP_WEBHOOK_ALLOWED_HOSTS``; with none
    allowed, webhooks are off) and, when its host is an IP literal, not an internal address unless
    ``LORP_WEBHOOK_ALLOWED_NETWORKS`` (``allowed_networks``) names it. Checked at submission, and again
    before each delivery (the operator's lists may have changed), where a host name's addresses are
    checked too."""
    try:
        target = webhook_policy.parse_webhook_url(url)
    except ValueError as exc:
        return f"notify.url {exc}"
    if not allowed:
        return "webhooks are off on this service: an operator allows hosts with LORP_WEBHOOK_ALLOWED_HOSTS"
    if not webhook_policy.host_allowed(target, allowed):
        listed = ", ".join(allowed)
        return (
            f"host {target.host!r} on port {target.port} is not one this service may call "
            f"(LORP_WEBHOOK_ALLOWED_HOSTS: {listed}; a host without a port allows the scheme's default port)"
        )
    networks = webhook_policy.parse_networks(allowed_networks or [], strict=False)
    if target.ip is not None and not webhook_policy.address_allowed(target.ip, networks):
        return (
            f"notify.url names an internal address ({target.ip}: loopback, private, link-local or reserved); "
            "an operator allows such networks with LORP_WEBHOOK_ALLOWED_NETWORKS"
        )
    return None
