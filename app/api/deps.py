"""Typed dependencies: settings, the request's unit of work, storage, and the calling principal.

The request's session comes from ``session_scope``, which commits when the route returns (before
the response is sent) and rolls back on any error. A route that must act after its writes are
durable (enqueueing a job) calls ``Database.commit()`` first; that is the only other commit.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from app.api.guard import checked_request
from app.core.config import Settings
from app.core.errors import Unauthorized
from app.core.security import ANONYMOUS, Principal
from app.db.session import session_factory, session_scope
from app.services.keys import verify_api_key
from app.services.workers import SupervisedWorker
from app.storage import Storage, artifact_store


class ServiceState:
    """What one app instance shares between requests; built lazily so creating the app does no I/O."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session] | None = None,
        supervised_worker: SupervisedWorker | None = None,
    ) -> None:
        self.settings = settings
        self.supervised_worker = supervised_worker  # lorp serve's embedded worker, where it runs one
        self._factory = factory
        self._storage: Storage | None = None
        self._lock = threading.Lock()

    @property
    def sessionmaker(self) -> sessionmaker[Session]:
        with self._lock:
            if self._factory is None:
                self._factory = session_factory(self.settings.sqlalchemy_url)
            return self._factory

    @property
    def storage(self) -> Storage:
        with self._lock:
            if self._storage is None:
                self._storage = artifact_store(self.settings)
            return self._storage


def service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


class Database:
    """The request's unit of work; services only flush, and ``commit`` makes the writes durable now."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def commit(self) -> None:
        self.session.commit()


def get_database(request: Request) -> Iterator[Database]:
    with session_scope(service_state(request).sessionmaker) as session:
        yield Database(session)


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in the thread
# pool, a hop that costs more than the work here (get_database and get_principal may block, so they hop).
async def get_settings_dep(request: Request) -> Settings:
    return service_state(request).settings


def get_storage(request: Request) -> Storage:
    return service_state(request).storage


# scope="function": the session commits when the route returns, before the response goes out, so a
# client never sees a job that is not yet visible to the next request.
DatabaseDep = Annotated[Database, Depends(get_database, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]


async def get_session(db: DatabaseDep) -> Session:
    return db.session


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

# Declared for the OpenAPI "Authorize" button; the header itself is checked below, so that a
# malformed Authorization header is refused rather than treated as absent.
_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer lorp_...")


def get_principal(
    request: Request,
    db: DatabaseDep,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    header = request.headers.get("authorization")
    if header is None:
        if settings.auth_enabled():
            raise Unauthorized("an API key is required: send Authorization: Bearer <key>")
        return ANONYMOUS
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be: Bearer <key>")
    key = verify_api_key(db.session, token)
    if key is None:
        raise Unauthorized("the API key is not valid or has been revoked")
    principal = Principal(key_id=key.id, is_admin=key.is_admin, name=key.name)
    # End the lookup's transaction in this thread (see UnitOfWorkRoute): the route opens its own.
    db.commit()
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal, scope="function")]


def _sessions_in(values: Iterable[object]) -> list[Session]:
    found: list[Session] = []
    for value in values:
        session = value.session if isinstance(value, Database) else value
        if isinstance(session, Session) and all(session is not s for s in found):
            found.append(session)
    return found


def _ends_its_unit_of_work(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` committing (or, when it raises, rolling back) its request's session before it returns.

    FastAPI runs a plain ``def`` route, and the exit of its ``yield`` dependencies, as separate jobs
    on one thread pool. A session committed only at the dependency's exit holds its database
    connection while that exit waits for a free thread; under many concurrent requests every thread
    can be blocked waiting for a connection held by a request waiting for a thread, until the pool
    times out (measured: 503s at 100 concurrent polls). Ending the transaction in the route's own
    thread returns the connection at once; the dependency's exit then has nothing left to commit.
    """

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        sessions = _sessions_in([*args, *kwargs.values()])
        try:
            result = endpoint(*args, **kwargs)
        except BaseException:
            for session in sessions:
                session.rollback()
            raise
        for session in sessions:
            session.commit()
        return result

    return run


class UnitOfWorkRoute(APIRoute):
    """The route class of every router here: sync endpoints end their unit of work themselves, and every
    request's input is checked for what no database can store before the route sees it (``app.api.guard``)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _ends_its_unit_of_work(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(checked_request(request))

        return checked
