"""The pruning methods, as the engine's registry (``lorp.selection.REGISTRY``) has them: what the web
form offers and the client lists, so neither keeps its own copy."""

from __future__ import annotations

from app.schemas import MethodOut, MethodsOut
from lorp.selection import REGISTRY, method_row
from lorp.spec import PruneSpec


def list_methods() -> MethodsOut:
    """Every registered method, in the registry's order, and the default a job without one runs."""
    default = PruneSpec.model_fields["method"].default
    return MethodsOut(methods=[MethodOut(**method_row(info)) for info in REGISTRY.values()], default=default)
