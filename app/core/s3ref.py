"""``s3://bucket/folder/`` references: the one parser for the operator's settings (``LORP_MODEL_S3_PREFIXES``,
an ``s3://`` artifact store), the request check (``app.jobspec.ModelLocation``), the submission
preflight and the worker's download.

A model reference names a folder inside a bucket, never the bucket itself: its key prefix has at
least one segment, and no segment is empty, ``.`` or ``..``; a store URL may name a whole bucket.
The path is percent-decoded as S3 keys are written, so what is checked is what would be read.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Location:
    """A folder in a bucket: ``prefix`` is its key prefix without leading or trailing ``/`` ("" for the
    whole bucket)."""

    bucket: str
    prefix: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    def within(self, other: S3Location) -> bool:
        """This folder is ``other`` or lies inside it."""
        return self.bucket == other.bucket and (
            self.prefix == other.prefix or not other.prefix or self.prefix.startswith(other.prefix + "/")
        )

    def overlaps(self, other: S3Location) -> bool:
        """Either folder holds the other: listing one would list some of the other's objects."""
        return self.within(other) or other.within(self)


def is_s3_url(value: str) -> bool:
    """``value`` is written as an ``s3://`` URL (the scheme in any case); :func:`parse_s3_location` reads it."""
    return value.lower().startswith("s3://")


def parse_s3_location(value: str, *, whole_bucket: bool = False) -> S3Location:
    """The folder ``s3://bucket/a/b/`` names (``s3://bucket`` too, when ``whole_bucket``); a ValueError
    quoting ``value`` and saying why when it names none."""
    parts = urlsplit(value.strip())
    if parts.scheme.lower() != "s3":
        raise ValueError(f"{value!r} is not an s3:// URL")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: query strings and fragments are not allowed")
    if not _BUCKET.match(parts.netloc):
        raise ValueError(f"{value!r} does not name a valid bucket")
    prefix = unquote(parts.path).strip("/")
    if not prefix and not whole_bucket:
        raise ValueError(f"{value!r} names a whole bucket; name a folder inside it (s3://bucket/folder/)")
    for segment in prefix.split("/") if prefix else ():
        if segment in ("", ".", ".."):
            raise ValueError(f"{value!r} has an empty, '.' or '..' segment")
        if "\\" in segment or any(unicodedata.category(c) == "Cc" for c in segment):
            raise ValueError(f"{value!r} holds a backslash or a control character")
    return S3Location(parts.netloc, prefix)
