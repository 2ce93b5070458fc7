"""/v1/methods: the pruning methods a job's ``method`` may name."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import PrincipalDep, UnitOfWorkRoute
from app.schemas import MethodsOut
from app.services import methods as methods_service

router = APIRouter(prefix="/methods", tags=["methods"], route_class=UnitOfWorkRoute)


@router.get("", response_model=MethodsOut)
def list_methods(principal: PrincipalDep) -> MethodsOut:
    """Every method the engine registers: what it does, whether it needs the model, whether ``auto``
    validates it and whether the budget curve draws it (the web form's and the client's choices)."""
    del principal  # any key may read the list; the dependency still enforces auth
    return methods_service.list_methods()
