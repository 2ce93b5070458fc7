"""A job's inputs, made local: uploaded datasets and ``s3://`` models fetched into the work folder.

Error messages name the inputs as the client knows them (``dataset <id>``, the ``s3://`` URL), never
the worker's own paths: :meth:`JobInputs.public_message` rewrites them.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.session import session_scope
from app.jobspec import JobCreate, RequestError, check_model_reference, dataset_kind, local_model_path, to_prune_spec
from app.repositories import lifecycle
from app.storage import Storage, storage_from_url
from worker.failures import JobFailure
from worker.retries import with_storage_retries

if TYPE_CHECKING:
    from lorp.spec import PruneSpec


class JobInputs:
    """Resolves one attempt's request into the engine's spec, fetching what lives elsewhere."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], storage: Callable[[], Storage], work_dir: Path
    ) -> None:
        self.settings = settings
        self.factory = factory
        self._storage = storage
        self.work_dir = work_dir
        # Local copies of the job's inputs, by the name the client knows them by (for error messages).
        self._public_names: dict[str, str] = {}

    @property
    def storage(self) -> Storage:
        return self._storage()

    def resolve(self, request: JobCreate) -> PruneSpec:
        """The engine's spec, with uploaded datasets and s3:// models fetched into the work folder."""
        kind = check_model_reference(request.model, self.settings)
        model_source = request.model.id
        if kind == "s3":
            model_source = str(self._download_model(request.model.id))
        elif kind == "local":
            model_source = str(local_model_path(model_source))
        calibration = self._resolve_dataset(request.calibration.dataset, "calibration.dataset")
        evaluation = (
            None
            if request.evaluation.dataset is None
            else self._resolve_dataset(request.evaluation.dataset, "evaluation.dataset")
        )
        return to_prune_spec(
            request, model_source=model_source, calibration_source=calibration, evaluation_source=evaluation
        )

    def _resolve_dataset(self, reference: str, field: str) -> str:
        kind = dataset_kind(reference)
        if kind != "uploaded":
            return reference  # "builtin" and "hf:..." are the engine's own grammar
        dataset_id = uuid.UUID(reference)
        with session_scope(self.factory) as session:
            dataset = lifecycle.find_dataset(session, dataset_id)
            if dataset is None:
                raise RequestError(f"dataset {reference} does not exist; upload it with POST /v1/datasets", field)
            fmt, text_field, key = dataset.format, dataset.text_field, dataset.storage_key
        suffix = ".jsonl" if fmt == "jsonl" else ".txt"
        local = self.work_dir / "data" / f"{dataset_id}{suffix}"
        self._public_names[str(local)] = f"dataset {reference}"
        if not local.exists():
            with_storage_retries(f"downloading dataset {reference}", lambda: self.storage.download_to(key, local))
        return f"{local}#{text_field or 'text'}" if fmt == "jsonl" else str(local)

    def _download_model(self, reference: str) -> Path:
        bucket, _, path = reference.removeprefix("s3://").partition("/")
        path = path.strip("/")
        if not path:
            raise RequestError("an s3:// model must name a folder inside the bucket, not the bucket", "model.id")
        # A store rooted at the model's folder: its keys are the files' paths inside the model directory.
        store = storage_from_url(f"s3://{bucket}/{path}", **self.settings.s3_options())
        keys = with_storage_retries(f"listing model {reference}", lambda: store.list(""))
        if not keys:
            raise JobFailure(
                "model_load_failed", f"no objects under {reference}; upload the model directory there first"
            )
        dest = self.work_dir / "model-source"
        self._public_names[str(dest)] = reference
        for key in keys:
            target = dest.joinpath(*key.split("/"))
            with_storage_retries(f"downloading {reference}/{key}", functools.partial(store.download_to, key, target))
        ggufs = [k for k in keys if k.endswith(".gguf")]
        if "config.json" not in keys and len(ggufs) == 1:
            return dest.joinpath(*ggufs[0].split("/"))
        return dest

    def public_message(self, message: str) -> str:
        """``message`` with the worker's own paths replaced by the names the client gave the inputs."""
        for local in sorted(self._public_names, key=len, reverse=True):
            message = message.replace(local, self._public_names[local])
        return message.replace(str(self.work_dir), "<job folder>")
