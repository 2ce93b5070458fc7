"""/v1/tasks: the downstream tasks a job's evaluation.tasks may name."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.api.deps import PrincipalDep, SessionDep, UnitOfWorkRoute
from app.schemas import EvalTasksOut
from app.services import eval_tasks as tasks_service

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=UnitOfWorkRoute)


@router.get("", response_model=EvalTasksOut)
def list_tasks(
    session: SessionDep,
    principal: PrincipalDep,
    source: Literal["built-in", "local", "hub"] | None = None,
    prefix: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_.:\-]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> EvalTasksOut:
    """The tasks the workers can run (built-in, then local, then lm-eval's registry, each by name)."""
    del principal  # any key may read the catalogue; the dependency still enforces auth
    return tasks_service.list_tasks(session, source=source, prefix=prefix, limit=limit, offset=offset)
