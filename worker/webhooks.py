"""Delivering webhooks: POST each finished job's view to its ``notify.url``, signed, at least once.

A dispatcher of its own sends them (:func:`start_dispatcher`; ``lorp reconciler`` and ``lorp serve``
run one beside the reconciler loop): every ``LORP_WEBHOOK_POLL_INTERVAL_S`` (1 s) it claims the
deliveries that are due (a job's final state, whoever wrote it, or a retry after
``LORP_WEBHOOK_RETRY_BASE_S``, doubling, at most an hour, up to ``LORP_WEBHOOK_MAX_ATTEMPTS``) and
sends them concurrently (``LORP_WEBHOOK_CONCURRENCY`` at a time), so a slow receiver delays neither
another's delivery nor the reconciler nor a job.

Each attempt is isolated and bounded:

- ``LORP_WEBHOOK_TIMEOUT_S`` is its whole limit: name resolution, connect, TLS, sending and the
  answer's status line. A receiver that trickles its answer is cut at the deadline like one that hangs.
- The URL is checked again (``app.jobspec.webhook_url_problem``: the operator's lists may have
  changed), the host resolved, and an internal address (loopback, private, link-local, CGNAT, ...:
  ``app.core.webhook_policy``) refused unless ``LORP_WEBHOOK_ALLOWED_NETWORKS`` names it. The
  connection goes to the very address checked; ``Host`` and TLS (SNI and the certificate check) use
  the URL's host name. Redirects are not followed; no proxy from the environment is used.
- Only the status code is read: the answer's body never is, so nothing of it is stored or logged.
- What the attempt records is coarse, so a job's owner cannot probe the network through it:
  ``HTTP <status>``, ``no HTTP answer within N s`` (refused, closed port, reset, timeout, TLS or
  protocol failure, an unresolvable name alike), ``address not allowed``. Details go to this log.
- Any exception of any kind ends that attempt only, recorded as its failure; a webhook that cannot be
  attempted at all (its URL no longer allowed) is given up, recorded, rather than retried forever.

One delivery per attempt, even with two dispatchers on SQLite: an attempt is claimed before it is
sent (``app.repositories.webhooks.claim``). A receiver may still see a delivery twice (a sender that
died after sending, before recording) and should use ``Lorp-Delivery`` (stable per job and event) to
drop repeats. Every attempt is at ``GET /v1/jobs/{id}/deliveries``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TypeVar

import httpx
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.webhook_policy import (
    IPAddress,
    IPNetwork,
    WebhookTarget,
    address_allowed,
    parse_networks,
    parse_webhook_url,
)
from app.db.base import utcnow
from app.db.models import Job
from app.db.session import session_factory, session_scope
from app.jobspec import webhook_url_problem
from app.repositories import webhooks as webhooks_repo
from app.services.job_views import job_out
from lorp_client.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign
from worker.failure_log import RepeatedFailure

log = logging.getLogger(__name__)

MAX_RETRY_S = 3600.0
# A claimed attempt is leased for its deadline plus this: time to record its result.
LEASE_MARGIN_S = 30.0
# How often attempts whose sender stopped (no result long after their lease) are marked as such.
SWEEP_EVERY_S = 60.0
# When a look found due jobs it did not claim (given up, or another dispatcher's), the next look comes this soon.
RELOOK_S = 0.05
REFUSED = "address not allowed"
NOT_ALLOWED = "not attempted: the URL is not one this service may call (any more)"
NOT_BUILT = "not attempted: the delivery could not be prepared"

T = TypeVar("T")


def retry_delay_s(attempt: int, base_s: float) -> float:
    """The wait after failed attempt ``attempt`` (1-based): ``base_s`` (LORP_WEBHOOK_RETRY_BASE_S, 30 s),
    doubling, at most an hour."""
    return min(base_s * 2 ** (attempt - 1), MAX_RETRY_S)


def no_answer(settings: Settings) -> str:
    """The one error text for every attempt that got no status line, whatever the network did."""
    return f"no HTTP answer within {settings.webhook_timeout_s:g} s"


class AddressRefused(Exception):
    """The host resolves only to addresses the policy refuses; no connection was made."""


@dataclass(frozen=True)
class Delivery:
    """One claimed attempt, ready to send: everything read from the database before the network."""

    job_id: uuid.UUID
    attempt: int
    target: WebhookTarget
    body: bytes
    headers: dict[str, str]
    last: bool  # no retry after this one


@dataclass(frozen=True)
class Batch:
    """What one look for due deliveries found: the attempts claimed, and every due job looked at
    (claimed, given up, or taken by another dispatcher first)."""

    deliveries: list[Delivery]
    looked_at: list[uuid.UUID]


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None
    duration_ms: float


def _event(job: Job) -> str:
    return f"job.{job.status.value}"


def _payload(session: Session, job: Job, settings: Settings) -> tuple[str, str, bytes]:
    event = _event(job)
    delivery_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"lorp:{job.id}:{event}"))
    view = job_out(session, job, settings).model_dump(mode="json")
    body = json.dumps({"event": event, "delivery": delivery_id, "job": view}, separators=(",", ":")).encode()
    return event, delivery_id, body


# -- the database side (synchronous, on the dispatcher's database thread) --------------------------------


class Store:
    """Claims due attempts and records their results; every call is its own transaction(s)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.factory = factory or session_factory(settings.sqlalchemy_url)

    def claim_due(
        self, limit: int, job_ids: list[uuid.UUID] | None = None, exclude: set[uuid.UUID] | None = None
    ) -> Batch:
        """Claim the attempts of up to ``limit`` due jobs (only ``job_ids``, none of ``exclude``), each in
        its own transaction: one that cannot be prepared is given up (recorded) and never stops the others."""
        settings = self.settings
        now = utcnow()
        with session_scope(self.factory) as session:
            due = webhooks_repo.due(
                session, now, max_attempts=settings.webhook_max_attempts, limit=limit, job_ids=job_ids, exclude=exclude
            )
        claimed: list[Delivery] = []
        for job_id, seen in due:
            try:
                delivery = self._claim_one(job_id, seen)
            except Exception:
                log.warning("job %s: its webhook could not be prepared; giving it up", job_id, exc_info=True)
                self._give_up(job_id, seen, NOT_BUILT)
                continue
            if delivery is not None:
                claimed.append(delivery)
        return Batch(claimed, [job_id for job_id, _ in due])

    def _claim_one(self, job_id: uuid.UUID, seen: int) -> Delivery | None:
        settings = self.settings
        now = utcnow()
        lease = now + dt.timedelta(seconds=settings.webhook_timeout_s + LEASE_MARGIN_S)
        with session_scope(self.factory) as session:
            job = session.get(Job, job_id)
            if job is None or job.notify_url is None:  # gone: no longer due
                return None
            if job.notify_secret is None:  # cannot be signed: given up by the caller
                raise ValueError("the job has a notify URL but no secret")
            problem = webhook_url_problem(
                job.notify_url, settings.webhook_allowed_hosts, settings.webhook_allowed_networks
            )
            if problem is not None:  # stored before a check existed, or the operator's lists changed
                log.warning("job %s: not delivering its webhook: %s", job_id, problem)
                webhooks_repo.give_up(
                    session,
                    job_id,
                    seen,
                    max_attempts=settings.webhook_max_attempts,
                    event=_event(job),
                    reason=NOT_ALLOWED,
                    at=now,
                )
                return None
            claimed = webhooks_repo.claim(session, job_id, seen, now=now, lease_until=lease)
            if claimed is None:  # another dispatcher took this attempt
                return None
            event, delivery_id, body = _payload(session, claimed, settings)
            webhooks_repo.start_attempt(session, claimed, event=event, at=now)
            assert claimed.notify_url is not None and claimed.notify_secret is not None
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(claimed.notify_secret, body),
                EVENT_HEADER: event,
                DELIVERY_HEADER: delivery_id,
                "User-Agent": "lorp-webhooks/1",
            }
            return Delivery(
                job_id=job_id,
                attempt=claimed.notify_attempts,
                target=parse_webhook_url(claimed.notify_url),
                body=body,
                headers=headers,
                last=claimed.notify_attempts >= settings.webhook_max_attempts,
            )

    def _give_up(self, job_id: uuid.UUID, seen: int, reason: str) -> None:
        try:
            with session_scope(self.factory) as session:
                job = session.get(Job, job_id)
                event = _event(job) if job is not None else "job.unknown"
                webhooks_repo.give_up(
                    session,
                    job_id,
                    seen,
                    max_attempts=self.settings.webhook_max_attempts,
                    event=event,
                    reason=reason,
                    at=utcnow(),
                )
        except Exception:
            log.warning("job %s: could not record giving its webhook up", job_id, exc_info=True)

    def record(self, delivery: Delivery, outcome: Outcome) -> None:
        now = utcnow()
        delay = retry_delay_s(delivery.attempt, self.settings.webhook_retry_base_s)
        retry = outcome.error is not None and not delivery.last
        with session_scope(self.factory) as session:
            webhooks_repo.finish_attempt(
                session,
                delivery.job_id,
                delivery.attempt,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=outcome.duration_ms,
                at=now,
                next_at=now + dt.timedelta(seconds=delay) if retry else None,
            )
        if outcome.error is None:
            log.info("job %s: webhook delivered (attempt %d)", delivery.job_id, delivery.attempt)
        else:
            log.warning(
                "job %s: webhook attempt %d failed: %s%s",
                delivery.job_id,
                delivery.attempt,
                outcome.error,
                "" if retry else "; giving up",
            )

    def sweep(self) -> int:
        """Attempts whose sender stopped before recording them (started longer ago than a lease)."""
        before = utcnow() - dt.timedelta(seconds=self.settings.webhook_timeout_s + 2 * LEASE_MARGIN_S)
        with session_scope(self.factory) as session:
            return webhooks_repo.close_abandoned(session, before)


# -- the network side (asynchronous) ---------------------------------------------------------------------


def _detail(exc: BaseException) -> str:
    """For the log only: what the network said, never what the receiver sent (a protocol error may
    quote the receiver's bytes, so only its type is kept)."""
    if isinstance(exc, OSError | httpx.ConnectError | httpx.ConnectTimeout):
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return type(exc).__name__


class Sender:
    """Sends one attempt under its deadline to an address the policy allows."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.networks: list[IPNetwork] = parse_networks(settings.webhook_allowed_networks, strict=False)
        # Certificates as httpx finds them (SSL_CERT_FILE / SSL_CERT_DIR, else certifi's bundle).
        self.tls: ssl.SSLContext = httpx.create_ssl_context()

    async def attempt(self, delivery: Delivery) -> Outcome:
        """Send ``delivery``; whatever happens becomes its outcome (nothing raises out of here)."""
        timeout = self.settings.webhook_timeout_s
        started = time.perf_counter()
        status: int | None = None
        try:
            async with asyncio.timeout(timeout):
                status = await self._post(delivery)
        except AddressRefused as exc:
            log.warning("job %s: webhook attempt %d refused: %s", delivery.job_id, delivery.attempt, exc)
            error: str | None = REFUSED
        except Exception as exc:  # of any kind: the network, TLS, the receiver's protocol, a URL httpx refuses
            log.warning(
                "job %s: webhook attempt %d got no HTTP answer within %g s: %s",
                delivery.job_id,
                delivery.attempt,
                timeout,
                _detail(exc),
            )
            error = no_answer(self.settings)
        else:
            error = None if 200 <= status < 300 else f"HTTP {status}"
        return Outcome(status, error, round((time.perf_counter() - started) * 1000, 1))

    async def resolve(self, target: WebhookTarget) -> IPAddress:
        """The first address of the host the policy allows; AddressRefused when there is none."""
        if target.ip is not None:
            candidates: list[IPAddress] = [target.ip]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            candidates = list(dict.fromkeys(ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
        for candidate in candidates:
            if address_allowed(candidate, self.networks):
                return candidate
        raise AddressRefused(f"{target.host} is {', '.join(map(str, candidates)) or 'nothing'}")

    async def _post(self, delivery: Delivery) -> int:
        target = delivery.target
        address = await self.resolve(target)
        # To the address just checked (no second lookup); Host and TLS name the URL's host.
        url = httpx.URL(
            scheme=target.scheme, host=address.compressed, port=target.port, raw_path=target.raw_path.encode()
        )
        headers = {**delivery.headers, "Host": target.host_header}
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.ip is None else {}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)  # never reuse a connection
        async with httpx.AsyncClient(
            verify=self.tls,
            trust_env=False,
            follow_redirects=False,
            limits=limits,
            timeout=self.settings.webhook_timeout_s,
        ) as client:
            request = client.build_request("POST", url, content=delivery.body, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            # Only the status line and headers have been read; closing drops the body unread.
            await response.aclose()
            return response.status_code


# -- the dispatcher --------------------------------------------------------------------------------------


class Dispatcher:
    """Claims due attempts and sends them concurrently, recording each result; one asyncio loop, with
    the database on a thread of its own so the loop never waits on it.

    An attempt without an HTTP answer is recorded at its deadline, as lasting the whole of it, whatever
    happened sooner (a closed port fails at once, a silent one at the deadline): neither its row nor
    when the next attempt comes tells a caller which it was. The wait holds no sending slot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings)
        self.sender = Sender(settings)
        self.counts = {"delivered": 0, "failed": 0}
        self.sending = 0
        self._claims = RepeatedFailure(log, "looking for due webhooks")
        self._slot_freed = asyncio.Event()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhooks-db")

    async def _on_db(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def deliver(self, delivery: Delivery) -> None:
        """Send one claimed attempt and record its outcome; nothing raises out of here."""
        self.sending += 1
        try:
            outcome = await self.sender.attempt(delivery)
        finally:
            self.sending -= 1
            self._slot_freed.set()
        self.counts["delivered" if outcome.error is None else "failed"] += 1
        if outcome.status_code is None:
            deadline_ms = self.settings.webhook_timeout_s * 1000
            await asyncio.sleep(max(0.0, deadline_ms - outcome.duration_ms) / 1000)
            outcome = Outcome(None, outcome.error, deadline_ms)
        try:
            await self._on_db(self.store.record, delivery, outcome)
        except Exception:  # the lease runs out and the attempt is made again
            log.warning("job %s: could not record webhook attempt %d", delivery.job_id, delivery.attempt, exc_info=True)

    async def claim(
        self, limit: int, job_ids: list[uuid.UUID] | None = None, exclude: set[uuid.UUID] | None = None
    ) -> Batch:
        try:
            batch = await self._on_db(self.store.claim_due, limit, job_ids, exclude)
        except Exception as exc:  # the database is away: said once with its traceback, then briefly
            self._claims.failed(exc)
            return Batch([], [])
        self._claims.succeeded()
        return batch

    async def once(self, job_ids: list[uuid.UUID] | None = None) -> dict[str, int]:
        """One attempt of everything due now (or only ``job_ids``'), ``LORP_WEBHOOK_CONCURRENCY`` at a
        time; returns when all are recorded."""
        limit = self.settings.webhook_concurrency
        looked_at: set[uuid.UUID] = set()
        while True:
            batch = await self.claim(limit, job_ids, looked_at)
            looked_at.update(batch.looked_at)
            if batch.deliveries:
                await asyncio.gather(*(self.deliver(d) for d in batch.deliveries))
            if len(batch.looked_at) < limit:  # nothing more was due
                return dict(self.counts)

    async def run(self, stop: threading.Event) -> None:
        """Until ``stop``: claim as many due attempts as there are free sending slots, every poll
        interval, or as soon as a slot frees while more were due."""
        settings = self.settings
        tasks: set[asyncio.Task[None]] = set()
        next_sweep = 0.0
        while not stop.is_set():
            free = settings.webhook_concurrency - self.sending
            batch = await self.claim(free) if free > 0 else Batch([], [])
            for delivery in batch.deliveries:
                task = asyncio.create_task(self.deliver(delivery))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_EVERY_S
                try:
                    await self._on_db(self.store.sweep)
                except Exception:
                    log.warning("could not mark abandoned webhook attempts", exc_info=True)
            self._slot_freed.clear()
            if free > 0 and len(batch.looked_at) < free:  # nothing more is due: look again in a while
                await asyncio.sleep(settings.webhook_poll_interval_s)
            elif len(batch.deliveries) < len(batch.looked_at):  # some given up or taken: look again soon
                await asyncio.sleep(min(RELOOK_S, settings.webhook_poll_interval_s))
            else:  # every slot busy, or more due than slots: look again when one frees
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), settings.webhook_poll_interval_s)
        if tasks:  # each ends by its deadline
            await asyncio.wait(tasks, timeout=settings.webhook_timeout_s + 5)

    def close(self) -> None:
        self._db.shutdown(wait=False)


def deliver_due(settings: Settings, *, job_ids: list[uuid.UUID] | None = None) -> dict[str, int]:
    """One dispatch pass in this thread: every delivery due now (or only ``job_ids``'), sent concurrently;
    returns how many were delivered and how many failed. ``lorp reconciler --once`` runs one."""
    dispatcher = Dispatcher(settings)
    try:
        return asyncio.run(dispatcher.once(job_ids))
    finally:
        dispatcher.close()


def run_dispatcher(settings: Settings, stop: threading.Event) -> None:
    """The dispatcher loop until ``stop`` is set; an unexpected error restarts it after a poll interval."""
    while not stop.is_set():
        dispatcher = Dispatcher(settings)
        try:
            asyncio.run(dispatcher.run(stop))
        except Exception:
            log.exception("the webhook dispatcher failed; restarting it")
            stop.wait(settings.webhook_poll_interval_s)
        finally:
            dispatcher.close()


def start_dispatcher(settings: Settings, stop: threading.Event) -> threading.Thread:
    """:func:`run_dispatcher` on a daemon thread of its own (started), until ``stop`` is set."""
    thread = threading.Thread(target=run_dispatcher, args=(settings, stop), name="webhooks", daemon=True)
    thread.start()
    return thread
