"""What-if planning on a job's stored S and D: pure selection, no model, no GPU.

A plan whose blocks the job itself scored (a candidate, or a point of its budget curve) carries
that validation perplexity; any other plan has none, since scoring needs the model.

A job that ran ``search`` also has validated plans: its search path (the best plan at each budget
up to the job's) is listed as method ``search`` for the requested budgets it reached.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.core.errors import Conflict, Unprocessable
from app.core.security import Principal
from app.jobspec import JobCreate
from app.repositories import analyses as analyses_repo
from app.schemas import PlanResult, PlansRequest, PlansResponse
from app.services.analysis import no_analysis_reason
from app.services.jobs import get_job
from lorp.errors import BudgetError, EngineError, InvalidRequestError, MissingStatisticError
from lorp.jsonable import finite
from lorp.selection import METHODS, SelectionOptions, analyze_structure, select
from lorp.spec import TargetSpec

SEARCH = "search"


def _options(request: PlansRequest, job_request: dict[str, object]) -> SelectionOptions:
    # Unset options default to the job's own, so the job's budget reproduces the job's plan.
    try:
        job_options: SelectionOptions = JobCreate.model_validate(job_request).options
    except ValueError:
        job_options = SelectionOptions()
    given = request.model_dump(include={"num_clusters", "protected_layers", "cluster_seed"}, exclude_none=True)
    return SelectionOptions.model_validate(
        {**job_options.model_dump(include=set(SelectionOptions.model_fields)), **given}
    )


def _budgets(request: PlansRequest, num_blocks: int) -> list[tuple[int, float | None, str]]:
    """(blocks, ratio, field) per requested budget."""
    if request.budgets is not None:
        return [(n, None, f"budgets.{i}") for i, n in enumerate(request.budgets)]
    assert request.ratios is not None
    out: list[tuple[int, float | None, str]] = []
    for i, ratio in enumerate(request.ratios):
        field = f"ratios.{i}"
        try:
            n = TargetSpec(ratio=ratio).blocks_for(num_blocks)
        except BudgetError as exc:
            raise Unprocessable(exc.message, field=field) from None
        except ValueError:
            raise Unprocessable(f"ratio {ratio} must lie strictly between 0 and 1", field=field) from None
        out.append((n, ratio, field))
    return out


def _search_path(summary: dict[str, Any] | None) -> dict[int, list[int]]:
    """The best plan at each budget of a job that ran ``search`` (from its summary), else empty."""
    selection = (summary or {}).get("selection") or {}
    path = selection.get("search_path") or []
    return {int(step["num_layers"]): [int(b) for b in step["pruned_layers"]] for step in path}


def _scored(summary: dict[str, Any] | None) -> dict[frozenset[int], float]:
    """Validation perplexity of every block set the job scored in full: its candidates and its budget curve.

    The curve's scores win where both have a set: they are all scored the same way (healed when
    the job heals), while a shipped candidate's may be its unhealed score.
    """
    summary = summary or {}
    scored: dict[frozenset[int], float] = {}
    for plan in (summary.get("plans") or {}).values():
        value = finite(plan.get("validation_perplexity"))
        if value is not None:
            scored[frozenset(int(b) for b in plan.get("pruned_layers", []))] = value
    for point in (summary.get("budget_curve") or {}).get("points", []):
        value = finite(point.get("validation_perplexity"))
        if value is not None:
            scored[frozenset(int(b) for b in point["pruned_layers"])] = value
    return scored


def _check_methods(request: PlansRequest, S: np.ndarray, D: np.ndarray | None, searched: dict[int, list[int]]) -> None:
    for i, name in enumerate(request.methods):
        if name in METHODS:
            continue
        if name == SEARCH:
            if not searched:
                raise Unprocessable(
                    "method 'search' scores plans on the model; this job did not run it, so it has no "
                    "searched plans to list (submit a job with method search)",
                    field=f"methods.{i}",
                )
            continue
        try:
            select(name, S, D, 1)  # raises the engine's own explanation for "auto" and unknown names
        except InvalidRequestError as exc:
            raise Unprocessable(exc.message, field=f"methods.{i}") from None
        raise Unprocessable(f"unknown method {name!r}", field=f"methods.{i}")


def _body_field(field: str | None) -> str | None:
    # A job's options sit under "options" in the job request, at the top level of a plans request.
    return field.removeprefix("options.") if field else field


def plan(session: Session, request: PlansRequest, principal: Principal) -> PlansResponse:
    """Every (method, budget) plan on the job's stored statistics, in milliseconds."""
    started = time.perf_counter()
    job = get_job(session, request.job_id, principal)
    analysis = analyses_repo.get(session, job.analysis_id) if job.analysis_id is not None else None
    if analysis is None:
        raise Conflict(no_analysis_reason(job), field="job_id", code="analysis_not_ready")
    S = np.asarray(analysis.similarity, dtype=np.float64)
    D = np.asarray(analysis.angular_distance, dtype=np.float64) if analysis.angular_distance else None
    num_blocks = S.shape[0] - 1
    options = _options(request, job.request)
    budgets = _budgets(request, num_blocks)
    searched = _search_path(job.summary)
    scored = _scored(job.summary)
    _check_methods(request, S, D, searched)
    try:
        structure = analyze_structure(S, options)
    except EngineError as exc:
        raise Unprocessable(exc.message, field=_body_field(exc.field)) from None

    results: list[PlanResult] = []
    for i, name in enumerate(request.methods):
        if name == SEARCH:
            continue
        fn = METHODS[name]
        for n, ratio, budget_field in budgets:
            try:
                selection = fn(S, D, n, options, structure=structure)
            except MissingStatisticError as exc:
                raise Unprocessable(exc.message, field=f"methods.{i}") from None
            except BudgetError as exc:
                raise Unprocessable(exc.message, field=budget_field) from None
            except EngineError as exc:
                raise Unprocessable(exc.message, field=_body_field(exc.field)) from None
            results.append(
                PlanResult(
                    method=name,
                    budget=n,
                    ratio=ratio,
                    pruned_layers=selection.pruned_layers,
                    rls=selection.structure.rls,
                    k=selection.structure.k,
                    clusters=selection.structure.clusters,
                    validation_perplexity=scored.get(frozenset(selection.pruned_layers)),
                )
            )
    listed = SEARCH in request.methods or "methods" not in request.model_fields_set
    if searched and listed:
        # The job's own search: its best plan at each budget it reached (validated when it ran).
        for n, ratio, _ in budgets:
            if n in searched:
                results.append(
                    PlanResult(
                        method=SEARCH,
                        budget=n,
                        ratio=ratio,
                        pruned_layers=searched[n],
                        rls=structure.rls,
                        k=structure.k,
                        clusters=structure.clusters,
                        validation_perplexity=scored.get(frozenset(searched[n])),
                    )
                )
    return PlansResponse(
        job_id=job.id,
        analysis_id=analysis.id,
        num_blocks=num_blocks,
        plans=results,
        elapsed_ms=(time.perf_counter() - started) * 1000.0,
    )
