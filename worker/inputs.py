"""A job's inputs, made local: uploaded datasets and ``s3://`` models fetched into the work folder.

What each reference is, and whether the settings allow it, is decided once by
``app.jobspec.resolve_references``: a hub id only through the hub's cache, a local model only inside
the model roots (every file of it), an ``s3://`` model only from a folder ``LORP_MODEL_S3_PREFIXES``
names. This module does the I/O that follows: an ``s3://`` model copied within bounded size, an
uploaded dataset looked up and fetched. The engine is told what each reference is and what the client
called it (``lorp.pipeline.Sources``), so the report and the provenance carry the client's names
(``dataset <id>``, the ``s3://`` URL, the model id), never the worker's paths;
:meth:`JobInputs.public_message` does the same for error messages.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from app import job_errors
from app.core.config import Settings
from app.core.s3ref import S3Location
from app.db.session import session_scope
from app.jobspec import (
    DatasetReference,
    JobCreate,
    JobReferences,
    RequestError,
    resolve_references,
    to_prune_spec,
)
from app.repositories import datasets as datasets_repo
from app.repositories import jobs as jobs_repo
from app.storage import Storage, model_folder_store
from app.storage.keys import key_problem
from worker import leftovers
from worker.failures import JobFailure
from worker.retries import with_database_retries, with_storage_retries

if TYPE_CHECKING:
    from lorp.pipeline import Sources
    from lorp.spec import PruneSpec

T = TypeVar("T")

# Hub datasets are cached here, under the service's data folder (never the home folder).
HUB_CACHE_SUBDIR = ("cache", "hub")


def analysis_scope(owner_id: uuid.UUID | None) -> str:
    """The scope a job's analysis is shared in: its owner (every anonymous job is one owner)."""
    return f"owner:{owner_id or 'anonymous'}"


class JobInputs:
    """Resolves one attempt's request into the engine's spec, fetching what lives elsewhere."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        storage: Callable[[], Storage],
        work_dir: Path,
        job_id: uuid.UUID | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self._storage = storage
        self.work_dir = work_dir
        self.job_id = job_id
        self.should_cancel = should_cancel
        # Local copies of the job's inputs, by the name the client knows them by (for error messages).
        self._public_names: dict[str, str] = {}
        self.sources: Sources | None = None

    @property
    def storage(self) -> Storage:
        return self._storage()

    def _fetch(self, what: str, fn: Callable[[], T]) -> T:
        """A storage call of the job's, retried while the store may come back (``LORP_OUTAGE_WAIT_S``)."""
        return with_storage_retries(what, fn, patience_s=self.settings.outage_wait_s, should_cancel=self.should_cancel)

    @property
    def model_copy_dir(self) -> Path:
        """Where an ``s3://`` model is copied (a folder of the work folder)."""
        return self.work_dir / "model-source"

    def resolve(self, request: JobCreate) -> PruneSpec:
        """The engine's spec, with uploaded datasets and s3:// models fetched into the work folder;
        ``self.sources`` then says what each reference is and what the client called it."""
        from lorp.pipeline import Sources

        refs = resolve_references(request, self.settings)
        model_source, roots = self._local_model(refs)
        calibration = self._local_dataset(refs.calibration)
        evaluation = None if refs.evaluation is None else self._local_dataset(refs.evaluation)
        self.sources = Sources(
            model_kind=refs.load_kind,
            model_roots=roots,
            model_name=refs.model_name,
            calibration_name=refs.calibration.name,
            evaluation_name=None if refs.evaluation is None else refs.evaluation.name,
            hub_cache=self.settings.resolved_data_dir.joinpath(*HUB_CACHE_SUBDIR),
            analysis_scope=analysis_scope(self._owner()),
            scratch=leftovers.scratch_folder(self.settings, self.job_id) if self.job_id is not None else None,
        )
        return to_prune_spec(
            request, model_source=model_source, calibration_source=calibration, evaluation_source=evaluation
        )

    def _owner(self) -> uuid.UUID | None:
        job_id = self.job_id
        if job_id is None:
            return None

        def read() -> uuid.UUID | None:
            with session_scope(self.factory) as session:
                return jobs_repo.owner_of(session, job_id)

        return self._read("reading the job's owner", read)

    def _read(self, what: str, fn: Callable[[], T]) -> T:
        """A database read the job cannot start without, waited for through an outage (``LORP_OUTAGE_WAIT_S``)."""
        return with_database_retries(what, fn, patience_s=self.settings.outage_wait_s)

    def _local_model(self, refs: JobReferences) -> tuple[str, tuple[Path, ...] | None]:
        """What the engine loads and the folders it must stay in: an ``s3://`` model's copy, confined to
        the folder it was copied into; else the local path or the id, with the reference's own roots."""
        if refs.model.s3 is not None:
            dest = self._download_model(refs.model_name, refs.model.s3)
            return str(dest), (self.model_copy_dir,)
        if refs.model.path is None:
            return refs.model_name, refs.model_roots  # the demo, a hub id
        self._public_names[str(refs.model.path)] = refs.model_name  # the client's own path, as it wrote it
        return str(refs.model.path), refs.model_roots

    def _local_dataset(self, dataset: DatasetReference) -> str:
        """What the engine reads for ``dataset``: an uploaded dataset's file fetched into the work folder
        (``#FIELD`` added for JSONL); the built-in corpus and ``hf:...`` as written (the engine's grammar)."""
        dataset_id = dataset.upload_id
        if dataset_id is None:
            return dataset.name

        def read() -> tuple[str, str | None, str] | None:
            with session_scope(self.factory) as session:
                row = datasets_repo.get(session, dataset_id)
                return None if row is None else (row.format, row.text_field, row.storage_key)

        found = self._read(f"reading dataset {dataset.name}", read)
        if found is None:
            raise RequestError(
                f"dataset {dataset.name} does not exist; upload it with POST /v1/datasets", dataset.field
            )
        fmt, text_field, key = found
        suffix = ".jsonl" if fmt == "jsonl" else ".txt"
        local = self.work_dir / "data" / f"{dataset_id}{suffix}"
        self._public_names[str(local)] = f"dataset {dataset.name}"
        if not local.exists():
            self._fetch(f"downloading dataset {dataset.name}", lambda: self.storage.download_to(key, local))
        return f"{local}#{text_field or 'text'}" if fmt == "jsonl" else str(local)

    def _download_model(self, reference: str, folder: S3Location) -> Path:
        """The model folder (or its one ``.gguf`` file) copied from S3, after checking what it holds:
        every key a plain relative file name, at most ``LORP_MODEL_S3_MAX_OBJECTS`` objects and
        ``LORP_MODEL_S3_MAX_BYTES`` in all, refused before anything is copied."""
        store = model_folder_store(folder, self.settings)
        keys = self._fetch(f"listing model {reference}", lambda: store.list(""))
        if not keys:
            raise JobFailure(
                job_errors.MODEL_LOAD_FAILED.code,
                f"no objects under {reference}; upload the model directory there first",
            )
        limit = self.settings.model_s3_max_objects
        if len(keys) > limit:
            raise JobFailure(
                job_errors.MODEL_LOAD_FAILED.code,
                f"{reference} holds {len(keys)} objects, more than a model folder may (LORP_MODEL_S3_MAX_OBJECTS: "
                f"{limit}); name the model's own folder",
            )
        for key in keys:
            if key_problem(key) is not None:
                raise JobFailure(
                    job_errors.MODEL_LOAD_FAILED.code,
                    f"{reference} holds an object whose key is not a plain relative file name",
                )
        total = 0
        for key in keys:
            total += self._fetch(f"sizing {reference}/{key}", functools.partial(store.size, key))
            if total > self.settings.model_s3_max_bytes:
                raise JobFailure(
                    job_errors.MODEL_LOAD_FAILED.code,
                    f"{reference} holds more than {self.settings.model_s3_max_bytes} bytes, more than this "
                    "service copies for a model (LORP_MODEL_S3_MAX_BYTES)",
                )
        dest = self.model_copy_dir
        self._public_names[str(dest)] = reference.rstrip("/")
        for key in keys:
            target = dest.joinpath(*key.split("/"))
            self._fetch(f"downloading {reference}/{key}", functools.partial(store.download_to, key, target))
        ggufs = [k for k in keys if k.endswith(".gguf")]
        if "config.json" not in keys and len(ggufs) == 1:
            return dest.joinpath(*ggufs[0].split("/"))
        return dest

    def public_message(self, message: str) -> str:
        """``message`` with the worker's own paths replaced by the names the client gave the inputs, and
        whatever else an unexpected error may quote of this machine (the data folder, the caches) by a
        label; in one pass, longest first, so a path the client sent itself stays as it sent it."""
        from huggingface_hub import constants

        from lorp.assets.cache import cache_dir

        names = {
            str(self.settings.resolved_data_dir): "<data folder>",
            str(Path(constants.HF_HUB_CACHE).expanduser()): "<hub cache>",
            str(cache_dir()): "<engine cache>",
            str(self.work_dir): "<job folder>",
            **self._public_names,
        }
        pattern = re.compile("|".join(re.escape(local) for local in sorted(names, key=len, reverse=True)))
        return pattern.sub(lambda match: names[match.group(0)], message)
