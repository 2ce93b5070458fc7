"""``s3://bucket/folder/`` references: one parser for the operator's setting (``LORP_MODEL_S3_PREFIXES``),
the request check, the submission preflight and the worker's download.

A reference names a folder inside a bucket, never the bucket itself: its key prefix has at least one
segment, and no segment is empty, ``.`` or ``..``. The path is percent-decoded as the storage layer
decodes it (``app.storage.storage_from_url``), so what is checked is what would be read.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Folder:
    """A folder in a bucket: ``prefix`` is its key prefix without leading or trailing ``/``."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"

    def within(self, other: S3Folder) -> bool:
        """This folder is ``other`` or lies inside it."""
        return self.bucket == other.bucket and (
            self.prefix == other.prefix or self.prefix.startswith(other.prefix + "/")
        )

    def overlaps(self, other: S3Folder) -> bool:
        """Either folder holds the other: listing one would list some of the other's objects."""
        return self.within(other) or other.within(self)


def parse_s3_folder(value: str) -> S3Folder:
    """The folder ``s3://bucket/a/b/`` names; ValueError saying why when it names none."""
    parts = urlsplit(value.strip())
    if parts.scheme.lower() != "s3":
        raise ValueError(f"{value!r} is not an s3:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: query strings and fragments are not allowed")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"{value!r} does not name a valid bucket")
    prefix = unquote(parts.path).strip("/")
    if not prefix:
        raise ValueError(f"{value!r} names a whole bucket; name a folder inside it (s3://bucket/folder/)")
    for segment in prefix.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"{value!r} has an empty, '.' or '..' segment")
        if "\\" in segment or any(unicodedata.category(c) == "Cc" for c in segment):
            raise ValueError(f"{value!r} holds a backslash or a control character")
    return S3Folder(parts.netloc, prefix)
