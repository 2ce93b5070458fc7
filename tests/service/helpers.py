"""Helpers shared by the service and reliability tests."""

from __future__ import annotations

import uuid

from app.core.config import Settings
from app.db.models import Dataset
from app.db.session import session_factory, session_scope
from worker import runner


def upload_dataset(settings: Settings, data: bytes, *, name: str = "corpus.txt") -> uuid.UUID:
    """Put a .txt corpus into storage and register it, as ``POST /v1/datasets`` does (without its checks)."""
    dataset_id = uuid.uuid4()
    key = f"datasets/{dataset_id}/data.txt"
    stored = runner.artifact_storage(settings).put_bytes(key, data, content_type="text/plain")
    with session_scope(session_factory(settings.sqlalchemy_url)) as session:
        session.add(
            Dataset(
                id=dataset_id,
                name=name,
                format="txt",
                text_field=None,
                size_bytes=stored.size,
                sha256=stored.sha256,
                storage_key=key,
                num_documents=1,
            )
        )
    return dataset_id
