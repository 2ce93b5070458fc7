"""Uploaded calibration corpora: validated while streamed, hashed, stored, recorded."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.core import client_json
from app.core.config import Settings
from app.core.errors import NotFound, PayloadTooLarge, Unprocessable
from app.core.security import Principal
from app.db.models import Dataset
from app.repositories import datasets as datasets_repo
from app.schemas import DatasetOut
from app.storage import Storage

CHUNK = 1 << 20
FORMATS = {".txt": ("txt", "text/plain; charset=utf-8"), ".jsonl": ("jsonl", "application/x-ndjson")}
DEFAULT_TEXT_FIELD = "text"
MAX_TEXT_FIELD_LEN = 128


class _JsonlChecker:
    """Checks JSONL line by line as chunks arrive: every non-blank line an object with a string field."""

    def __init__(self, text_field: str) -> None:
        self.text_field = text_field
        self.pending = ""
        self.line = 0
        self.documents = 0

    def feed(self, text: str, *, final: bool = False) -> None:
        lines = (self.pending + text).split("\n")
        self.pending = "" if final else lines.pop()
        for line in lines:
            self._check(line)

    def _check(self, line: str) -> None:
        self.line += 1
        if not line.strip():
            return
        try:
            # Bounded nesting: Python's parser recurses per level, and a line of 100,000 "[" would crash it.
            record = client_json.loads(line)
        except client_json.JsonRefused as exc:
            raise Unprocessable(f"line {self.line}: {exc}", field="file") from None
        except json.JSONDecodeError as exc:
            raise Unprocessable(f"line {self.line} is not valid JSON ({exc.msg})", field="file") from None
        if not isinstance(record, dict):
            raise Unprocessable(f"line {self.line} is not a JSON object", field="file")
        if self.text_field not in record:
            fields = ", ".join(client_json.escape_unstorable(str(key)) for key in list(record)[:20]) or "none"
            raise Unprocessable(
                f"line {self.line} has no field {self.text_field!r} (its fields: {fields}); "
                "set text_field to the field that holds the text",
                field="text_field",
            )
        if not isinstance(record[self.text_field], str):
            raise Unprocessable(
                f"line {self.line}: field {self.text_field!r} is "
                f"{type(record[self.text_field]).__name__}, not a string",
                field="text_field",
            )
        # The escapes "\u0000" and "\ud800" decode to a NUL (binary, as in a .txt upload) and to half a
        # character (no tokenizer or UTF-8 writer takes it): neither is calibration text.
        if (problem := client_json.text_problem(record[self.text_field])) is not None:
            raise Unprocessable(f"line {self.line}: field {self.text_field!r} {problem}", field="file")
        self.documents += 1


def _has_control_chars(value: str) -> bool:
    # Postgres text cannot hold NUL, and control characters in a display name only mislead.
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


def _display_name(name: str | None, filename: str | None) -> str:
    if name is not None and _has_control_chars(name):
        raise Unprocessable("name must not contain control characters", field="name")
    # Only the last component of the client's filename is kept (a path like ../../x.txt is never used
    # as a path: the object key is derived from the dataset id).
    fallback = "".join(c for c in Path((filename or "dataset").replace("\\", "/")).name if not _has_control_chars(c))
    return (name or fallback).strip()[:255] or "dataset"


def _format_of(filename: str | None) -> tuple[str, str]:
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise Unprocessable(
            "upload a .txt (UTF-8 text) or .jsonl (one JSON object per line) file, "
            f"not {filename or 'a nameless file'!r}",
            field="file",
        )
    return FORMATS[suffix]


def _spool_and_check(src: BinaryIO, dest: BinaryIO, fmt: str, text_field: str, limit: int) -> tuple[int, str, int]:
    """Copy ``src`` to ``dest`` while checking size, encoding and format; returns (size, sha256, documents)."""
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    checker = _JsonlChecker(text_field) if fmt == "jsonl" else None
    size = 0
    has_text = False
    while chunk := src.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the file exceeds the upload limit of {limit} bytes", field="file")
        if b"\x00" in chunk:
            raise Unprocessable("the file looks binary (it holds NUL bytes); upload UTF-8 text", field="file")
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise Unprocessable(
                f"the file is not valid UTF-8 text (byte offset {size - len(chunk) + exc.start})", field="file"
            ) from None
        has_text = has_text or bool(text.strip())
        if checker is not None:
            checker.feed(text)
        digest.update(chunk)
        dest.write(chunk)
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise Unprocessable("the file ends in the middle of a UTF-8 character", field="file") from None
    if checker is not None:
        checker.feed(tail, final=True)
    if not has_text:
        raise Unprocessable("the file holds no text", field="file")
    documents = checker.documents if checker is not None else 1
    if documents == 0:
        raise Unprocessable("the file holds no JSON lines", field="file")
    return size, digest.hexdigest(), documents


def upload_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    *,
    src: BinaryIO,
    filename: str | None,
    name: str | None = None,
    text_field: str | None = None,
) -> Dataset:
    """Validate, hash and store an uploaded corpus, and record it (flushed, not committed)."""
    fmt, content_type = _format_of(filename)
    if fmt == "txt" and text_field is not None:
        raise Unprocessable("text_field applies to .jsonl uploads only", field="text_field")
    if fmt == "jsonl":
        text_field = DEFAULT_TEXT_FIELD if text_field is None else text_field
        if not text_field.strip() or len(text_field) > MAX_TEXT_FIELD_LEN:
            raise Unprocessable(f"text_field must hold 1 to {MAX_TEXT_FIELD_LEN} characters", field="text_field")
        if _has_control_chars(text_field):
            raise Unprocessable("text_field must not contain control characters", field="text_field")
    display_name = _display_name(name, filename)

    dataset_id = uuid.uuid4()
    key = f"datasets/{dataset_id}/data.{fmt}"
    fd, tmp_name = tempfile.mkstemp(prefix="lorp-upload-", suffix=f".{fmt}")
    try:
        with os.fdopen(fd, "wb") as tmp:
            size, sha256, documents = _spool_and_check(src, tmp, fmt, text_field or "", settings.max_upload_bytes)
        # Stored only once the whole file passed: a refused upload leaves nothing behind.
        stored = storage.put_file(key, Path(tmp_name), content_type=content_type)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    dataset = Dataset(
        id=dataset_id,
        owner_id=principal.owner_id,
        name=display_name,
        format=fmt,
        text_field=text_field if fmt == "jsonl" else None,
        size_bytes=size,
        sha256=stored.sha256 or sha256,
        storage_key=key,
        num_documents=documents,
    )
    try:
        return datasets_repo.add(session, dataset)
    except Exception:
        # The row was refused: the stored object would be listed by nothing, so remove it.
        with contextlib.suppress(Exception):
            storage.delete_prefix(f"datasets/{dataset_id}")
        raise


def get_dataset(session: Session, dataset_id: uuid.UUID, principal: Principal) -> Dataset:
    """The dataset if the principal may see it; 404 otherwise."""
    dataset = datasets_repo.get_visible(session, dataset_id, principal)
    if dataset is None:
        raise NotFound(f"no dataset {dataset_id}", field="dataset_id")
    return dataset


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        format=dataset.format,
        text_field=dataset.text_field,
        size_bytes=dataset.size_bytes,
        sha256=dataset.sha256,
        num_documents=dataset.num_documents,
        created_at=dataset.created_at,
        reference=str(dataset.id),
    )
