"""API keys in the database: create (the plaintext is shown once), verify a presented key, revoke."""

from __future__ import annotations

import datetime as dt
import hmac
import uuid

from sqlalchemy.orm import Session

from app.core.security import DISPLAY_PREFIX_LEN, KEY_PREFIX, generate_api_key, hash_api_key
from app.db.base import as_utc, utcnow
from app.db.models import ApiKey
from app.repositories import keys as keys_repo

# Refresh last_used_at at most this often, so reads do not turn into a write per request.
_TOUCH_INTERVAL = dt.timedelta(minutes=1)


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
    last = None if row.last_used_at is None else as_utc(row.last_used_at)
    if last is None or now - last > _TOUCH_INTERVAL:
        keys_repo.touch(session, row.id, now)
    return row


def revoke_api_key(session: Session, key_id: uuid.UUID) -> bool:
    """Revoke a key (flushed, not committed); False when it is unknown or already revoked."""
    return keys_repo.revoke(session, key_id, utcnow())
