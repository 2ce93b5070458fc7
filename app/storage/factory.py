"""A store from a URL: ``s3://bucket[/prefix]``, ``file:///abs/dir`` or a plain folder path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from app.core.s3ref import S3Location, parse_s3_location
from app.storage.base import Storage
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage

if TYPE_CHECKING:
    from app.core.config import Settings


def storage_from_url(url: str, **s3_options: Any) -> Storage:
    """Build a store from "s3://bucket[/prefix]", "file:///abs/dir" or a plain path; s3_options go to S3Storage."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("storage URL is empty: use s3://bucket[/prefix], file:///absolute/folder or a folder path")
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        try:
            location = parse_s3_location(url, whole_bucket=True)
        except ValueError as exc:
            raise ValueError(f"storage URL {exc}: use s3://bucket[/prefix]") from None
        return S3Storage(location.bucket, prefix=location.prefix, **s3_options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r} names a remote host; file URLs must be local (file:///abs/dir)")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"storage URL {url!r} must hold an absolute path (file:///abs/dir)")
        return LocalStorage(Path(path))
    if "://" in url:
        raise ValueError(f"storage URL {url!r}: unsupported scheme {parts.scheme!r}; use s3:// or file://")
    return LocalStorage(Path(url))


def artifact_store(settings: Settings) -> Storage:
    """The artifact store the settings name, with their S3 connection options: the one the API, the
    worker and the reconciler all use."""
    return storage_from_url(settings.artifact_storage_url, **settings.s3_options())


def model_folder_store(folder: S3Location, settings: Settings) -> Storage:
    """A store rooted at a model's folder on S3 (its keys are the files' paths inside the model
    directory), with the settings' S3 connection options: what the API's preflight reads the
    config from and the worker downloads."""
    return S3Storage(folder.bucket, prefix=folder.prefix, **settings.s3_options())
