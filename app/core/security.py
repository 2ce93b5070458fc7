"""API keys: ``lorp_`` + a random token, stored only as a sha256 hash and a short display prefix."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import ApiKey
from app.repositories import keys as keys_repo

KEY_PREFIX = "lorp_"
DISPLAY_PREFIX_LEN = 12
# Refresh last_used_at at most this often, so reads do not turn into a write per request.
_TOUCH_INTERVAL = dt.timedelta(minutes=1)


def generate_api_key() -> str:
    """A new plaintext key; it is shown once and never stored."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(plaintext: str) -> str:
    """The hex sha256 of a key, which is all the database keeps."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str, admin: bool = False) -> tuple[str, ApiKey]:
    """Create a key (flushed, not committed); returns the plaintext, to be shown once, and the row."""
    plaintext = generate_api_key()
    row = ApiKey(
        name=name,
        prefix=plaintext[:DISPLAY_PREFIX_LEN],
        key_hash=hash_api_key(plaintext),
        is_admin=admin,
    )
    keys_repo.add(session, row)
    return plaintext, row


def verify_api_key(session: Session, plaintext: str) -> ApiKey | None:
    """The active key matching ``plaintext``, or None for an unknown or revoked key."""
    if not plaintext.startswith(KEY_PREFIX) or len(plaintext) > 256:
        return None
    digest = hash_api_key(plaintext)
    row = keys_repo.get_by_hash(session, digest)
    # The lookup is by hash, so timing reveals nothing about the key; the explicit constant-time
    # compare guards against a collation or index that matches loosely.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    if row.revoked_at is not None:
        return None
    now = utcnow()
    last = row.last_used_at
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=dt.UTC)
    if last is None or now - last > _TOUCH_INTERVAL:
        keys_repo.touch(session, row.id, now)
    return row


def revoke_api_key(session: Session, key_id: uuid.UUID) -> bool:
    """Revoke a key (flushed, not committed); False when it is unknown or already revoked."""
    return keys_repo.revoke(session, key_id, utcnow())


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
