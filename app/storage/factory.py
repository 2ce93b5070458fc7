"""A store from a URL: ``s3://bucket[/prefix]``, ``file:///abs/dir`` or a plain folder path."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from app.storage.base import Storage
from app.storage.local import LocalStorage
from app.storage.s3 import S3Storage


def storage_from_url(url: str, **s3_options: Any) -> Storage:
    """Build a store from "s3://bucket[/prefix]", "file:///abs/dir" or a plain path; s3_options go to S3Storage."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("storage URL is empty: use s3://bucket[/prefix], file:///absolute/folder or a folder path")
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket: use s3://bucket[/prefix]")
        if parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: query strings and fragments are not supported")
        return S3Storage(parts.netloc, prefix=unquote(parts.path).strip("/"), **s3_options)
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
