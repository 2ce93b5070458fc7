"""Webhook signatures, for the service that signs and the receiver that checks.

Every delivery is a POST whose body is JSON ``{"event", "delivery", "job"}`` (``job`` as
``GET /v1/jobs/{id}`` shows it), with the header::

    Lorp-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body, keyed by the job's notify.secret>

the way Stripe signs: the timestamp is inside the signed bytes, so a receiver that refuses old
timestamps refuses replays too. A receiver checks it with :func:`verify` on the raw body.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Lorp-Signature"
EVENT_HEADER = "Lorp-Event"
DELIVERY_HEADER = "Lorp-Delivery"
DEFAULT_TOLERANCE_S = 300.0


class SignatureError(ValueError):
    """The signature is missing, malformed, wrong, or too old."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Lorp-Signature`` header value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify(secret: str, body: bytes, header: str | None, *, tolerance_s: float = DEFAULT_TOLERANCE_S) -> int:
    """Check a delivery's signature header against its raw body; returns its timestamp, else raises."""
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    parts = dict(item.split("=", 1) for item in header.split(",") if "=" in item)
    try:
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        raise SignatureError(f"malformed {SIGNATURE_HEADER}: {header!r}") from None
    expected = sign(secret, body, t).split("v1=", 1)[1]
    if not hmac.compare_digest(expected, given):
        raise SignatureError("the signature does not match the body (wrong secret, or the body was changed)")
    if abs(time.time() - t) > tolerance_s:
        raise SignatureError(f"the signature is {abs(time.time() - t):.0f} s old (more than {tolerance_s:g} s)")
    return t
