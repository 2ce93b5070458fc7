"""/v1/plans: the blocks each method would cut at given budgets, from a job's stored S and D."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, SessionDep
from app.schemas import PlansRequest, PlansResponse
from app.services import plans as plans_service

router = APIRouter(prefix="/plans", tags=["plans"])


@router.post("", response_model=PlansResponse)
def create_plans(request: PlansRequest, session: SessionDep, principal: PrincipalDep) -> PlansResponse:
    """Plan budgets and methods on a finished analysis without loading a model."""
    return plans_service.plan(session, request, principal)
