"""A finished attempt's outputs: uploaded under ``jobs/{id}/``, then published with the status in one
transaction (plans, metrics, the analysis, the artifact list and the job's summary)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from app.db.session import session_scope
from app.jobspec import JobCreate
from app.repositories import analyses as analyses_repo
from app.repositories import lifecycle
from app.repositories.lifecycle import ArtifactRow, MetricRow, PlanRow, TaskMetricRow
from app.storage import Storage
from app.storage.keys import job_prefix
from lorp.errors import JobCancelled
from lorp.jsonable import finite, json_safe
from lorp.result import METRICS, RATIO_UNIT
from worker.retries import with_storage_retries

if TYPE_CHECKING:
    from lorp.pipeline import PruneResult
    from lorp.result import PruneReport

log = logging.getLogger(__name__)

T = TypeVar("T")


def upload(
    storage: Storage,
    job_id: uuid.UUID,
    out_dir: Path,
    *,
    should_cancel: Callable[[], bool],
    on_progress: Callable[[float], None],
    patience_s: float,
) -> list[ArtifactRow]:
    """Every output file under ``jobs/{job_id}/{relative name}``, replacing what an earlier attempt left.

    ``on_progress`` gets the fraction of bytes uploaded after each file; ``should_cancel`` is asked
    before each one, and while a failing store is waited for (up to ``patience_s``, ``worker.retries``).
    """
    prefix = job_prefix(job_id)

    def retried(what: str, fn: Callable[[], T]) -> T:
        return with_storage_retries(what, fn, patience_s=patience_s, should_cancel=should_cancel)

    retried(f"clearing {prefix}", lambda: storage.delete_prefix(prefix))
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files) or 1
    sent = 0
    rows: list[ArtifactRow] = []
    for path in files:
        if should_cancel():
            raise JobCancelled("the job was cancelled during upload")
        name = path.relative_to(out_dir).as_posix()
        key = f"{prefix}/{name}"
        stored = retried(f"uploading {name}", functools.partial(storage.put_file, key, path))
        rows.append(
            ArtifactRow(
                name=name,
                storage_key=key,
                size_bytes=stored.size,
                sha256=stored.sha256,
                content_type=stored.content_type,
            )
        )
        sent += stored.size
        on_progress(sent / total)
    return rows


def publish(
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    attempt: int,
    request: JobCreate,
    result: PruneResult,
    artifacts: list[ArtifactRow],
    *,
    fingerprint: str | None,
    reused_analysis_id: uuid.UUID | None,
) -> bool:
    """Store (or link) the analysis and publish plans, metrics, artifacts and status together."""
    report = result.report
    structure = report.analysis
    provenance = json_safe(report.provenance)
    fingerprint = fingerprint or report.fingerprint or ""
    with session_scope(factory) as session:
        if reused_analysis_id is not None:
            analysis_id = reused_analysis_id
        else:
            stored = analyses_repo.store(
                session,
                fingerprint=fingerprint,
                model_source=request.model.id,
                model_revision=(provenance.get("model") or {}).get("commit") or request.model.revision,
                dataset_sha256=str((provenance.get("calibration") or {}).get("text_sha256", "")),
                num_samples=request.calibration.num_samples,
                seq_len=request.calibration.seq_len,
                seed=request.calibration.seed,
                num_tokens=int(result.stats.num_tokens),
                num_blocks=int(result.stats.num_blocks),
                similarity=json_safe(result.stats.S),
                angular_distance=json_safe(result.stats.D),
                rls=finite(structure.rls),
                k=int(structure.k),
                clusters=json_safe(structure.clusters),
                redundancy=json_safe(structure.redundancy),
                provenance=provenance,
            )
            analysis_id = stored.id
        return lifecycle.finish_succeeded(
            session,
            job_id,
            attempt,
            analysis_id=analysis_id,
            analysis_reused=reused_analysis_id is not None,
            chosen_method=report.chosen.candidate,
            pruned_layers=[int(i) for i in report.chosen.pruned_layers],
            plans=plan_rows(report),
            metrics=metric_rows(report),
            task_metrics=task_metric_rows(report),
            artifacts=artifacts,
            summary=summary_of(report, artifacts, analysis_id, reused_analysis_id is not None, job_id),
        )


def plan_rows(report: PruneReport) -> list[PlanRow]:
    return [
        PlanRow(
            name=name,
            k=plan.k,
            pruned_layers=[int(i) for i in plan.pruned_layers],
            validation_perplexity=finite(plan.validation_perplexity),
            chosen=name == report.chosen.candidate,
        )
        for name, plan in report.plans.items()
    ]


def metric_rows(report: PruneReport) -> list[MetricRow]:
    rows: list[MetricRow] = []
    for phase, values in (("dense", report.metrics.dense), ("pruned", report.metrics.pruned)):
        for name, kind in METRICS.items():
            value = finite(values.get(name))
            if value is not None:
                rows.append(MetricRow(name=name, phase=phase, value=value, unit=kind.unit))
    for name, ratio in report.metrics.ratios().items():
        value = finite(ratio)
        if value is not None:
            rows.append(MetricRow(name=name, phase="ratio", value=value, unit=RATIO_UNIT))
    return rows


def task_metric_rows(report: PruneReport) -> list[TaskMetricRow]:
    return [
        TaskMetricRow(
            task=str(score["task"]),
            metric=str(score["metric"]),
            phase=phase,
            value=finite(score.get("value")),
            stderr=finite(score.get("stderr")),
            num_samples=int(score.get("num_samples") or 0),
            num_fewshot=score.get("num_fewshot"),
        )
        for phase, values in (("dense", report.metrics.dense), ("pruned", report.metrics.pruned))
        for score in values.get("tasks", [])
    ]


def summary_of(
    report: PruneReport, artifacts: list[ArtifactRow], analysis_id: uuid.UUID, reused: bool, job_id: uuid.UUID
) -> dict[str, Any]:
    """The small JSON a job shows once finished; the full detail lives in the tables and report.json."""
    structure, metrics = report.analysis, report.metrics
    return json_safe(
        {
            "num_blocks": structure.num_blocks,
            "num_layers_removed": report.num_layers_removed,
            "rls": structure.rls,
            "k": structure.k,
            "clusters": structure.clusters,
            "method": report.method,
            "chosen": {"candidate": report.chosen.candidate, "pruned_layers": report.chosen.pruned_layers},
            "plans": {
                name: {
                    "pruned_layers": p.pruned_layers,
                    "validation_perplexity": p.validation_perplexity,
                    "validation_kl": p.validation_kl,
                }
                for name, p in report.plans.items()
            },
            "metrics": {
                "dense": {k: metrics.dense.get(k) for k in METRICS},
                "pruned": {k: metrics.pruned.get(k) for k in METRICS},
                "ratio": metrics.ratios(),
            },
            "analysis_id": str(analysis_id),
            "analysis_reused": reused,
            "fingerprint": report.fingerprint,
            "artifacts": {
                "prefix": job_prefix(job_id),
                "count": len(artifacts),
                "total_bytes": sum(a.size_bytes for a in artifacts),
                "model_dir": "model",
            },
            "timings_s": report.timings_s,
            "heal": dataclasses.asdict(report.heal),
            "selection": dataclasses.asdict(report.selection) if report.selection is not None else None,
            "tasks": _task_table(report),
            "generations": [dataclasses.asdict(g) for g in report.generations],
            "budget_curve": dataclasses.asdict(report.budget_curve) if report.budget_curve is not None else None,
            "execution": _execution(report),
        }
    )


def _execution(report: PruneReport) -> dict[str, Any] | None:
    """How the model ran, with the device's own name (a GPU's model) beside its torch name."""
    execution = report.execution
    if execution is None:
        return None
    return {
        "mode": execution.mode,
        "requested": execution.requested,
        "reason": execution.reason,
        "device": execution.device,
        "device_name": execution.device_name,
        "block_loads": execution.block_loads,
        "skipped": list(execution.skipped),
        "resumed_at_block": execution.resumed_at_block,
    }


def _task_table(report: PruneReport) -> list[dict[str, Any]]:
    """Each task metric with its dense and pruned value side by side."""
    dense = {(t["task"], t["metric"]): t for t in report.metrics.dense.get("tasks", [])}
    pruned = {(t["task"], t["metric"]): t for t in report.metrics.pruned.get("tasks", [])}
    table = []
    for key in dict.fromkeys([*dense, *pruned]):
        d, p = dense.get(key, {}), pruned.get(key, {})
        table.append(
            {
                "task": key[0],
                "metric": key[1],
                "dense": d.get("value"),
                "pruned": p.get("value"),
                "dense_stderr": d.get("stderr"),
                "pruned_stderr": p.get("stderr"),
                "num_samples": d.get("num_samples", p.get("num_samples")),
            }
        )
    return table
