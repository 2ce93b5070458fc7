"""/v1/plans: the blocks each method would cut at given budgets, from a job's stored S and D."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, SessionDep, UnitOfWorkRoute
from app.schemas import PlansRequest, PlansResponse, Problem
from app.services import plans as plans_service

router = APIRouter(prefix="/plans", tags=["plans"], route_class=UnitOfWorkRoute)


# Besides the problems every /v1 route documents (app.main): a body that is not JSON at all is a 400,
# and a job whose analysis is not stored yet is a 409 (analysis_not_ready).
_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": Problem, "description": "the body is not parseable JSON (application/problem+json)"},
    409: {"model": Problem, "description": "the job has no analysis yet (application/problem+json)"},
}


@router.post("", response_model=PlansResponse, responses=_RESPONSES)
def create_plans(request: PlansRequest, session: SessionDep, principal: PrincipalDep) -> PlansResponse:
    """Plan budgets and methods on a finished analysis without loading a model."""
    return plans_service.plan(session, request, principal)
