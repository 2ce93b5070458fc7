"""The storage interface every backend implements, the objects it returns and its errors."""

from __future__ import annotations

import builtins
import mimetypes
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from app.core.errors import ServiceError

CHUNK_SIZE = 1 << 20
_CONTENT_TYPES = {".jsonl": "application/x-ndjson", ".md": "text/markdown", ".safetensors": "application/octet-stream"}


@dataclass(frozen=True)
class StoredObject:
    """An object as written: key, size in bytes, hex sha256 of its content, content type."""

    key: str
    size: int
    sha256: str
    content_type: str


class StorageError(ServiceError):
    """A storage operation failed; `retryable` says whether the same call may succeed later.

    Clients are told only that storage is unavailable: the message names buckets and keys.
    """

    status, code, title = 503, "storage_unavailable", "Service Unavailable"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable

    @property
    def public_message(self) -> str:
        return "object storage is unavailable; retry later"


class ObjectNotFound(StorageError):
    """No object exists under the key (a row points at an object the store no longer holds)."""

    status, code, title = 404, "object_missing", "Not Found"

    def __init__(self, key: str, where: str = "") -> None:
        super().__init__(f"object {key!r} not found" + (f" in {where}" if where else ""), retryable=False)
        self.key = key

    @property
    def public_message(self) -> str:
        return "the stored file is missing"


def guess_content_type(key: str) -> str:
    suffix = Path(key).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"


def iter_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(chunk_size):
            yield chunk


class Storage(ABC):
    """One interface over object stores; keys are slash-separated relative paths."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> StoredObject:
        """Store the file at `path` under `key`, streaming it and computing its sha256."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> StoredObject:
        """Store `data` under `key`."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open the object for streaming reads; raises ObjectNotFound at once if it is missing."""

    @abstractmethod
    def download_to(self, key: str, path: Path) -> None:
        """Write the object to `path` atomically, creating parent folders."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists under `key`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises ObjectNotFound if it is missing."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete the object named `prefix` and everything under `prefix/`; returns how many objects went."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys equal to `prefix` or under `prefix/` ("" lists everything)."""

    @abstractmethod
    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        """A time-limited GET URL for the object, or None where the backend has none."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raise StorageError if the store cannot be used."""

    @abstractmethod
    def describe(self) -> str:
        """Where objects go, for logs and errors (no credentials)."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Iterate the object's bytes; the object is opened now so a missing key fails before streaming."""
        return iter_chunks(self.open(key), chunk_size)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
