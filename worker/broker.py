"""The embedded broker as the worker consumes it: kombu's SQLAlchemy transport, drained in short cycles.

A transport without an event loop (kombu's SQLAlchemy one, the embedded mode's broker) runs under
Celery's ``synloop``, which waits up to 2 s in each ``drain_events`` and looks whether it should
stop only between waits, then waits once more on its way out: measured here, an idle worker took
3.8 s to stop cold and 4.8 s warm, most of it in those waits, and ``lorp serve`` as long to exit.
:class:`PromptTransport` ends each wait after :data:`CYCLE_S` (the loop then simply cycles, as it
does after any empty wait) and polls the queue as often, so a stop is seen within a cycle and a job
is picked up within one. The API's producer keeps kombu's own transport: both read the same tables.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Transport

CYCLE_S = 0.5
ALIAS = "lorp-sqla"  # the consumer's name for the transport, in its broker URL


class PromptTransport(Transport):
    """kombu's SQLAlchemy transport whose waits for a message last at most :data:`CYCLE_S`."""

    polling_interval = CYCLE_S

    # kombu's virtual transport narrows its base's signature the same way.
    def drain_events(self, connection: Any, timeout: float | None = None) -> Any:  # type: ignore[override]
        if timeout is not None and timeout > CYCLE_S:
            timeout = CYCLE_S
        return super().drain_events(connection, timeout=timeout)


TRANSPORT_ALIASES[ALIAS] = f"{__name__}:PromptTransport"


def consumer_url(broker_url: str) -> str:
    """The URL the worker consumes ``broker_url`` by: the embedded SQLAlchemy broker through
    :class:`PromptTransport`, any other as it is."""
    return f"{ALIAS}+{broker_url.removeprefix('sqla+')}" if broker_url.startswith("sqla+") else broker_url
