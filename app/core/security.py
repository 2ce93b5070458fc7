"""API keys as values (``lorp_`` + a random token, kept only as its sha256) and who is calling.

Creating, checking and revoking keys in the database is ``app/services/keys.py``.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

KEY_PREFIX = "lorp_"
DISPLAY_PREFIX_LEN = 12


def generate_api_key() -> str:
    """A new plaintext key; it is shown once and never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(plaintext: str) -> str:
    """The hex sha256 of a key, which is all the database keeps."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: an API key, or the anonymous owner of an open embedded service (``key_id`` None)."""

    key_id: uuid.UUID | None
    is_admin: bool = False
    name: str = "anonymous"

    @property
    def owner_id(self) -> uuid.UUID | None:
        return self.key_id


ANONYMOUS = Principal(key_id=None, is_admin=False)
