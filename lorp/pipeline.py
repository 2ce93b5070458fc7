"""One-call entry points: ``run_prune`` (a whole job) and ``run_analysis`` (capture only).

A job runs in four phases, each a function with typed inputs and outputs that can be called on its
own: :func:`validate` (load or open the model, check the job against it before any pass),
:func:`plan` (calibration, capture, candidates and their scores, the chosen plan, the budget curve),
:func:`execute` (measure, heal and remove, write, verify) and :func:`report` (the charts and
``report.json`` from the three results). :func:`run_prune` calls them in turn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorp import assets
from lorp import calibration as cal
from lorp.blocks import decoder_blocks, remove_blocks
from lorp.curve import best_points, budget_curve, check_budgets, default_budgets, with_distilled
from lorp.distill import (
    DistillSummary,
    dense_finals,
    distill,
    distilled_weights,
    plan_teacher,
    pruned_anchors,
    training_autocast,
    trial,
    windows_to_read,
)
from lorp.divergence import DenseFinals, Divergence
from lorp.downstream import check_tasks, run_tasks
from lorp.errors import InvalidRequestError, JobCancelled
from lorp.evaluation import greedy_completions, measure_speed, perplexity
from lorp.execution import Batch, Runner
from lorp.execution.choice import WorkingSet, memory_budget
from lorp.execution.healed import FoldedMap
from lorp.execution.scratch import StateStore
from lorp.export import PrunedLogits, save_pruned, verify_reload, verify_reload_blockwise, verify_reload_sequential
from lorp.loading import LoadedModel, ModelKind, load_model
from lorp.local_distill import distill_locally, pruned_weight_names
from lorp.model_card import CARD_FILE, write_model_card
from lorp.options import DEFAULT_HEAL_STEPS, DEFAULT_LOCAL_HEAL_STEPS, folds_maps
from lorp.planner import (
    HEAL_MODE,
    PlanChoice,
    choose_plan,
    heal_token_cap,
    heal_windows,
    hidden_size,
    resolve_heal,
)
from lorp.report import library_versions, plot_budget_curve, plot_heatmap, plot_plans, save_analysis, write_report
from lorp.result import (
    BudgetCurve,
    ChosenPlan,
    ExecutionSummary,
    Generation,
    HealSummary,
    Metrics,
    PlanScore,
    PruneReport,
    SelectionSummary,
    StructureSummary,
)
from lorp.scoring import apply_fits
from lorp.selection import Selection, analyze_structure, scored_methods, validate_budget
from lorp.similarity import SimilarityStats, capture_similarity
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, curve_refusal, execution_refusal
from lorp.stages import Stage
from lorp.states import Riders, StateCache, StateSink, StoredStateCache, stored_cache, window_store
from lorp.surgery import stored_dtypes, stored_tensor_dtypes, write_pruned

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]
AnalysisLookup = Callable[[str], "tuple[SimilarityStats, dict[str, Any]] | None"]


MODEL_SUBDIR = "model"


@dataclass(frozen=True)
class Sources:
    """How a caller other than the CLI (the service's worker) resolved the spec's references.

    The spec then names local copies (an uploaded dataset's file, an ``s3://`` model's download); what
    the report, the provenance and messages show are the names the caller's own client used, and a
    reader of the report learns nothing of where this machine keeps things.

    Attributes:
        model_kind: what ``spec.model.id`` is (``lorp.loading.load_model``'s ``kind``); None: inferred.
        model_roots: a local model's files (links followed) must lie inside these; None: not confined.
        model_name: what the report calls the model (default: ``spec.model.id``).
        calibration_name: what it calls the calibration text (default: ``spec.calibration.dataset``).
        evaluation_name: what it calls the evaluation text (default: ``spec.evaluation.dataset``).
        hub_cache: where hub datasets are cached (default: the engine's cache folder).
        analysis_scope: analyses are shared only between runs of one scope (the service: one owner);
            it enters the calibration fingerprint, so a stored capture is found only within it.
        scratch: where a sequential run keeps its states so that a later attempt of the same job resumes
            (the worker: a folder per job kept across attempts); None: a temporary folder, removed.
    """

    model_kind: ModelKind | None = None
    model_roots: tuple[Path, ...] | None = None
    model_name: str | None = None
    calibration_name: str | None = None
    evaluation_name: str | None = None
    hub_cache: Path | None = None
    analysis_scope: str | None = None
    scratch: Path | None = None


_CLI = Sources()


@dataclass
class PruneResult:
    """What a pruning run produced."""

    out_dir: Path
    model_dir: Path
    report: PruneReport
    stats: SimilarityStats
    selection: Selection


class _Stages:
    """Progress reporting, stage timing and cancellation checks for one run."""

    def __init__(self, progress: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        self.progress = progress
        self.should_cancel = should_cancel
        self.timings: dict[str, float] = {}
        self.runner: Runner | None = None  # a sequential job's: its block loads are counted per stage
        self.block_loads: dict[str, int] = {}

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise JobCancelled("the job was cancelled")

    def fraction(self, stage: Stage, low: float = 0.0, high: float = 1.0) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` for the part [low, high] of a stage."""

        def report(done: int, total: int) -> None:
            if self.progress is not None:
                self.progress(stage, low + (high - low) * done / max(total, 1))

        return report

    @contextmanager
    def stage(self, name: Stage) -> Iterator[None]:
        self.check()
        if self.progress is not None:
            self.progress(name, 0.0)
        start = time.perf_counter()
        runner = self.runner
        loads = runner.block_loads if runner is not None else 0
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        if runner is not None:
            self.block_loads[name] = runner.block_loads - loads
        if self.progress is not None:
            self.progress(name, 1.0)


def _check_options(n_blocks: int, spec: PruneSpec) -> None:
    k = spec.options.num_clusters
    if k is not None and not 2 <= k <= n_blocks - 2:
        raise InvalidRequestError(
            f"num_clusters must be between 2 and N-2 = {n_blocks - 2} for this {n_blocks}-block model, got {k}",
            field="options.num_clusters",
        )


def working_set(spec: CalibrationSpec, num_training: int = 0) -> WorkingSet:
    """What a job keeps beside the weights (``options.execution: auto``'s budget): the dense states of
    the validation and heal windows, one batch, and distillation's states on its ``num_training``
    windows (:func:`num_training_windows`)."""
    capture = spec.num_samples * spec.seq_len
    return WorkingSet(
        validation_tokens=spec.validation_windows * spec.seq_len,
        batch_tokens=spec.batch_size * spec.seq_len,
        heal_tokens=lambda width: min(capture, heal_token_cap(width)),
        distill_tokens=num_training * spec.seq_len,
    )


def _load(
    spec: ModelSpec, sources: Sources = _CLI, execution: str = "resident", working: WorkingSet | None = None
) -> LoadedModel:
    return load_model(
        spec.id,
        kind=sources.model_kind,
        roots=sources.model_roots,
        name=sources.model_name,
        revision=spec.revision,
        dtype=spec.dtype,
        device=spec.device,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        execution=execution,
        working=working,
    )


def _calibration_data(
    loaded: LoadedModel, spec: CalibrationSpec, sources: Sources = _CLI, num_training: int = 0
) -> cal.CalibrationData:
    source = cal.parse_source(spec.dataset)
    texts = cal.load_texts(source, role="calibration", hub_cache=sources.hub_cache)
    return cal.build_calibration(
        loaded.tokenizer,
        texts,
        num_samples=spec.num_samples,
        seq_len=spec.seq_len,
        seed=spec.seed,
        chat_template=spec.chat_template,
        validation_fraction=spec.validation_fraction,
        max_validation_windows=spec.validation_windows,
        num_training=num_training,
    )


def num_training_windows(spec: PruneSpec) -> int:
    """The windows whole-model distillation trains on (``options.heal: distill``), each read a few
    times (``lorp.distill.windows_to_read``); 0 without distillation."""
    if spec.options.heal != "distill":
        return 0
    return windows_to_read(_heal_steps(spec, DEFAULT_HEAL_STEPS), spec.calibration.batch_size)


def _heal_steps(spec: PruneSpec, default_steps: int) -> int:
    """``options.heal_steps``, or ``default_steps`` when unset."""
    steps = spec.options.heal_steps
    return default_steps if steps is None else steps


def _prepare_out_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"output directory {out} is not empty", field="out")
    out.mkdir(parents=True, exist_ok=True)
    return out


# The calibration fields a capture's S and D do not depend on, and why (calibration_fingerprint).
NOT_IN_CAPTURE = {
    "dataset": "the text's own hash stands for it: the same text under another name is the same capture",
    "batch_size": "how many windows run at once, not which",
    "validation_windows": "how many held-out windows score plans; the split itself is validation_fraction",
}


def calibration_fingerprint(
    provenance: dict[str, Any], data: cal.CalibrationData, spec: CalibrationSpec, scope: str | None = None
) -> str:
    """A key for (model, calibration text, sampling settings): equal keys give equal S and D.

    ``scope`` (``Sources.analysis_scope``) makes keys of different scopes differ: a capture is reused
    only within the scope it was made in."""
    # Where the weights sit does not change S; what they are does. With a content hash, the path is
    # left out, so the same weights downloaded to another folder (an s3:// model) reuse the capture.
    hashed = any(k in provenance for k in ("weights_sha256", "file_sha256", "gguf_sha256"))
    ignored = {"device", "source"} if hashed else {"device"}
    parts = [
        repr(sorted((k, str(v)) for k, v in provenance.items() if k not in ignored)),
        data.text_sha256,
        # Every field of the spec, in its declared order, but those that cannot change S and D: a new
        # calibration option makes captures differ until it is named here.
        *(str(getattr(spec, name)) for name in type(spec).model_fields if name not in NOT_IN_CAPTURE),
    ]
    if scope is not None:
        parts.append(f"scope={scope}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def capture_provenance(
    loaded: LoadedModel,
    data: cal.CalibrationData,
    spec: CalibrationSpec,
    stats: SimilarityStats,
    sources: Sources = _CLI,
) -> dict[str, Any]:
    """Where S and D came from: the model, the calibration text and sampling, and their fingerprint."""
    return {
        "model": loaded.provenance,
        "calibration": {
            "source": sources.calibration_name or spec.dataset,
            "text_sha256": data.text_sha256,
            "num_samples": spec.num_samples,
            "seq_len": spec.seq_len,
            "seed": spec.seed,
            "chat_template": spec.chat_template,
            "num_tokens": stats.num_tokens,
            "angular": stats.angular_mode,
        },
        "fingerprint": calibration_fingerprint(loaded.provenance, data, spec, sources.analysis_scope),
    }


def run_analysis(
    model_spec: ModelSpec,
    calibration: CalibrationSpec,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    loaded: LoadedModel | None = None,
    sources: Sources | None = None,
) -> tuple[SimilarityStats, dict[str, Any]]:
    """Load the model (unless given) and capture S and D; returns the statistics and their provenance.

    Args:
        model_spec: The model to analyse.
        calibration: Calibration text and sampling settings.
        progress: Called as ``progress(stage, fraction)``.
        should_cancel: Checked between stages and batches.
        loaded: An already loaded model to reuse.
        sources: How the caller resolved the references (:class:`Sources`); the CLI's by default.
    """
    sources = sources or _CLI
    stages = _Stages(progress, should_cancel)
    if loaded is None:
        with stages.stage(Stage.loading):
            loaded = _load(model_spec, sources)
    with stages.stage(Stage.calibration):
        data = _calibration_data(loaded, calibration, sources)
    with stages.stage(Stage.capture):
        stats = capture_similarity(
            loaded.model,
            data.capture,
            batch_size=calibration.batch_size,
            angular=calibration.angular,
            progress=stages.fraction(Stage.capture),
            should_cancel=should_cancel,
        )
    provenance = {
        **capture_provenance(loaded, data, calibration, stats, sources),
        "libraries": library_versions(),
        "timings_s": stages.timings,
    }
    return stats, provenance


def _speed_prompt(windows: cal.TokenWindows, prompt_len: int, batch: int) -> torch.Tensor:
    # A prompt longer than an evaluation window is clipped to it; the metrics record the length used.
    row = windows.input_ids[0][windows.attention_mask[0].bool()]
    return row[:prompt_len].unsqueeze(0).repeat(batch, 1)


def _skipped_in_sequence(spec: PruneSpec) -> list[str]:
    """What a sequential run does not measure (each needs the model whole on the device), as asked."""
    ev = spec.evaluation
    whole = "needs the model whole on the device, and this job runs it one block at a time"
    skipped = []
    if ev.speed:
        skipped.append(f"evaluation.speed: decode and prefill speed {whole}")
    if ev.tasks:
        skipped.append(f"evaluation.tasks: lm-eval tasks {whole}")
    if ev.prompts:
        skipped.append(f"evaluation.prompts: greedy completions {whole}")
    return skipped


def _measure_sequential(
    loaded: LoadedModel,
    eval_windows: cal.TokenWindows | None,
    spec: PruneSpec,
    stages: _Stages,
    stage: Stage,
    removed: Sequence[int] = (),
    fits: Sequence[FoldedMap] = (),
    keep: DenseFinals | None = None,
    against: DenseFinals | None = None,
    taken: PrunedLogits | None = None,
    ran: Riders | None = None,
) -> dict[str, Any]:
    """The metrics a sequential run measures, dense or (``removed``, ``fits``) pruned: perplexity (and,
    pruned, the divergence from the dense predictions) through the execution layer, and the block and
    parameter counts. ``taken`` keeps the first batch's logits for the reload check; with ``ran`` (the
    evaluation windows' batches and final states from the plan's dense pass) only the head runs."""
    assert loaded.runner is not None
    metrics: dict[str, Any] = {}
    if eval_windows is not None and spec.evaluation.perplexity:
        metrics.update(
            _held_out(
                loaded.runner,
                eval_windows,
                spec,
                stages,
                stages.fraction(stage),
                keep=keep,
                against=against,
                removed=removed,
                fits=fits,
                on_first_batch=None if taken is None else taken.take,
                ran=ran,
            )
        )
    blocks = decoder_blocks(loaded.model)
    gone = {id(p) for i in set(removed) for p in blocks[i].parameters()}
    metrics["num_layers"] = len(blocks) - len(set(removed))
    metrics["num_parameters"] = int(sum(p.numel() for p in loaded.model.parameters() if id(p) not in gone))
    stages.check()
    return metrics


def _held_out(
    model: Any,
    eval_windows: cal.TokenWindows,
    spec: PruneSpec,
    stages: _Stages,
    progress: Callable[[int, int], None],
    *,
    keep: DenseFinals | None = None,
    against: DenseFinals | None = None,
    **view: Any,
) -> dict[str, float]:
    """Held-out perplexity; the dense pass ``keep``s its final states, and the pruned pass, ``against``
    them, adds its divergence from the dense predictions (``lorp.divergence``)."""
    divergence = Divergence() if against is not None else None
    metrics = {
        "perplexity": perplexity(
            model,
            eval_windows,
            batch_size=spec.calibration.batch_size,
            should_cancel=stages.should_cancel,
            progress=progress,
            keep=keep,
            against=against,
            divergence=divergence,
            **view,
        )
    }
    if divergence is not None:
        metrics.update(divergence.summary())
    return metrics


def _measure(
    loaded: LoadedModel,
    eval_windows: cal.TokenWindows | None,
    spec: PruneSpec,
    stages: _Stages,
    stage: Stage,
    keep: DenseFinals | None = None,
    against: DenseFinals | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The model's metrics as it is now (perplexity and, pruned, the divergence from the dense
    predictions; speed, downstream tasks) and its completions."""
    model = loaded.model
    metrics: dict[str, Any] = {}
    ev = spec.evaluation
    split = 0.5 if ev.tasks else 1.0  # perplexity fills the stage's progress, or its first half
    if eval_windows is not None and ev.perplexity:
        progress = stages.fraction(stage, 0.0, split)
        metrics.update(_held_out(model, eval_windows, spec, stages, progress, keep=keep, against=against))
    if eval_windows is not None and ev.speed:
        prompt = _speed_prompt(eval_windows, ev.speed_prompt_len, ev.speed_batch)
        metrics.update(measure_speed(model, prompt, new_tokens=ev.speed_new_tokens))
    metrics["num_layers"] = len(decoder_blocks(model))
    metrics["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    if ev.tasks:
        scores, seconds = run_tasks(
            model,
            loaded.tokenizer,
            ev.tasks,
            batch_size=spec.calibration.batch_size,
            progress=stages.fraction(stage, split, 1.0),
            should_cancel=stages.should_cancel,
        )
        metrics["tasks"] = [dataclasses.asdict(score) for score in scores]
        metrics["tasks_s"] = round(seconds, 3)
    stages.check()
    completions = greedy_completions(model, loaded.tokenizer, list(ev.prompts), new_tokens=ev.generate_tokens)
    return metrics, completions


def _heal_summary(choice: PlanChoice, distilled: DistillSummary | None = None) -> HealSummary:
    """How the cuts shipped: unhealed, linear maps, or (``distill``) the maps and the distilled adapters,
    with the distillation's figures whichever of the two shipped."""
    if choice.heal == "none":
        return HealSummary(method="none", reason=choice.heal_reason)
    return HealSummary(
        method=distilled.shipped if distilled is not None else choice.heal,
        mode=HEAL_MODE,
        num_tokens=choice.heal_tokens,
        spans=[dataclasses.asdict(fit.span) for fit in choice.fits],
        reason=distilled.reason if distilled is not None and distilled.shipped != "distill" else None,
        distill=dataclasses.asdict(distilled) if distilled is not None else None,
    )


def _selection_summary(choice: PlanChoice) -> SelectionSummary:
    return SelectionSummary(
        evaluations=choice.evaluations,
        screenings=choice.screenings,
        heal_fits=choice.heal_fits,
        cache_s=choice.cache_s,
        scoring_s=choice.scoring_s,
        search_path=[dataclasses.asdict(step) for step in choice.search_path],
        quality_target=choice.quality.summary() if choice.quality is not None else None,
    )


def _budget_curve(
    choice: PlanChoice, stats: SimilarityStats, spec: PruneSpec, stages: _Stages, high: float = 1.0
) -> BudgetCurve | None:
    requested = spec.evaluation.curve_budgets
    budgets = default_budgets(choice.n) if requested is None else sorted(requested)
    if not budgets or choice.scorer is None:
        return None
    searched = {len(step.pruned_layers): list(step.pruned_layers) for step in choice.search_path}
    return budget_curve(
        choice.scorer,
        stats.S,
        stats.D,
        budgets,
        spec.options,
        analyze_structure(stats.S, spec.options),
        searched=searched,
        progress=stages.fraction(Stage.budget_curve, 0.0, high),
    )


def _distilled_curve(
    prepared: Prepared,
    data: cal.CalibrationData,
    choice: PlanChoice,
    curve: BudgetCurve,
    spec: PruneSpec,
    stages: _Stages,
    teacher: tuple[DenseFinals, DenseFinals] | None,
) -> BudgetCurve:
    """``evaluation.curve_distill``: the best plan at each curve budget distilled as the job distils its
    own (resident: ``lorp.distill.trial`` on the dense model, undone after; sequential: block-local),
    its shipped validation perplexity put on its point. The curve stage's second half."""
    assert choice.scorer is not None  # a curve is drawn only where plans were scored
    best = best_points(curve)
    found: dict[int, float] = {}
    for done, (n, point) in enumerate(best.items()):
        fits = choice.scorer.fits(point.pruned_layers)
        low = 0.5 + 0.5 * done / len(best)
        training = {
            **_training(spec, stages, DEFAULT_LOCAL_HEAL_STEPS if prepared.sequential else DEFAULT_HEAL_STEPS),
            "progress": stages.fraction(Stage.budget_curve, low, low + 0.5 / len(best)),
        }
        if prepared.sequential:
            assert prepared.loaded.runner is not None
            summary, _ = distill_locally(
                prepared.loaded.runner, data.capture, data.validation, removed=point.pruned_layers, fits=fits,
                **training,
            )  # fmt: skip
        else:
            assert teacher is not None
            summary = trial(
                prepared.loaded.model, point.pruned_layers, fits, data.training_windows, teacher[0], data.validation,
                teacher[1], autocast=training_autocast(prepared.loaded.model), **training,
            )  # fmt: skip
        found[n] = summary.shipped_perplexity
    return with_distilled(curve, found)


def _save(
    loaded: LoadedModel,
    model_dir: Path,
    removed: Sequence[int],
    fits: Sequence[FoldedMap],
    replaced: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the pruned model: by tensor surgery on the source's safetensors files when there are any
    (the stored dtypes kept, about one tensor held at a time), else ``save_pretrained`` of the model in
    memory (a GGUF file, pickled weights); the tokenizer and generation config as the engine loaded them."""
    if loaded.weights is None:
        save_pruned(loaded.model, loaded.tokenizer, model_dir)
        return
    folds = {fit.anchor: fit for fit in fits}  # each map read as its tensor is written
    write_pruned(loaded.weights, model_dir, removed, folds, replaced=replaced, device=loaded.device)
    if not (model_dir / "generation_config.json").exists() and loaded.model.generation_config is not None:
        loaded.model.generation_config.save_pretrained(model_dir)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(model_dir)


def _second_copy_fits(loaded: LoadedModel) -> bool:
    """Whether the device's memory budget holds a second copy of the (pruned, resident) model beside
    it, as ``verify_reload``'s ``from_pretrained`` needs."""
    held = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    budget, _ = memory_budget(loaded.device)
    return 2 * held <= budget


@contextmanager
def _capture_scratch(sources: Sources) -> Iterator[Path]:
    """The folder a sequential capture keeps its states in: the caller's (kept, so that a retry
    resumes; the caller removes it when the job has ended), or a temporary one removed afterwards."""
    if sources.scratch is not None:
        sources.scratch.mkdir(parents=True, exist_ok=True)
        yield sources.scratch
        return
    with tempfile.TemporaryDirectory(prefix="lorp-scratch-") as tmp:
        yield Path(tmp)


def _execution_summary(
    loaded: LoadedModel,
    spec: PruneSpec,
    reload_check: dict[str, Any],
    by_stage: dict[str, int],
    resumed_at: int | None = None,
) -> ExecutionSummary:
    choice = loaded.execution
    assert choice is not None
    checked = int(reload_check.get("block_loads", 0))  # the written model's, run block by block
    if checked:
        by_stage = {**by_stage, Stage.verifying.value: by_stage.get(Stage.verifying.value, 0) + checked}
    return ExecutionSummary(
        mode=choice.mode,
        requested=choice.requested,
        reason=choice.reason,
        device=choice.device,
        device_name=choice.device_name,
        # the job's passes, and the reload check's where it ran the written model block by block
        block_loads=(loaded.runner.block_loads if loaded.runner is not None else 0) + checked,
        block_loads_by_stage=by_stage,
        budget_bytes=choice.budget_bytes,
        weights_bytes=choice.weights_bytes,
        working_bytes=choice.working_bytes,
        skipped=_skipped_in_sequence(spec) if loaded.runner is not None else [],
        resumed_at_block=resumed_at,
    )


def _heatmap_title(source: str, method: str, chosen: str, pruned: list[int], healed: bool = False) -> str:
    name = Path(source).name if "/" in source else source
    plan = f"{method} chose {chosen}" if method in scored_methods() and chosen != method else method
    return f"{name}: {plan}, removing blocks {pruned}{' (healed)' if healed else ''}"


def _reused_provenance(
    stored: dict[str, Any], loaded: LoadedModel, spec: CalibrationSpec, sources: Sources
) -> dict[str, Any]:
    """A stored capture's provenance as this run's: its model and calibration text under this run's
    names (the capture that stored it may have named the same weights and text otherwise)."""
    calibration = {**(stored.get("calibration") or {}), "source": sources.calibration_name or spec.dataset}
    return {**stored, "model": loaded.provenance, "calibration": calibration}


def _public_request(spec: PruneSpec, sources: Sources) -> dict[str, Any]:
    """The spec as the report shows it: the references under the names the caller's client used."""
    request = spec.model_dump(mode="json")
    if sources.model_name is not None:
        request["model"]["id"] = sources.model_name
    if sources.calibration_name is not None:
        request["calibration"]["dataset"] = sources.calibration_name
    if sources.evaluation_name is not None:
        request["evaluation"]["dataset"] = sources.evaluation_name
    return request


@dataclass
class Prepared:
    """What :func:`validate` hands on: the model, loaded whole or opened to run block by block, checked
    against the job (budget, options, curve budgets, tasks) before any pass."""

    loaded: LoadedModel
    n_blocks: int

    @property
    def sequential(self) -> bool:
        return self.loaded.runner is not None

    @property
    def run_on(self) -> Any:
        """What the passes run on: the resident model, or the runner that loads its blocks one at a time."""
        return self.loaded.runner if self.loaded.runner is not None else self.loaded.model


@dataclass
class Planned:
    """What :func:`plan` found: the calibration and evaluation windows, S and D with their provenance,
    the chosen plan (with every candidate's score and the heal fits) and the budget curve."""

    data: cal.CalibrationData
    eval_texts: list[str]
    eval_windows: cal.TokenWindows | None
    stats: SimilarityStats
    provenance: dict[str, Any]
    reused: bool
    choice: PlanChoice
    curve: BudgetCurve | None
    resumed_at_block: int | None = None  # a sequential capture that went on from an earlier attempt's states
    teacher: tuple[DenseFinals, DenseFinals] | None = None  # drawing the curve distilled kept them for execute
    dense_ran: Riders | None = None  # sequential: the evaluation windows, carried by the plan's dense pass


@dataclass
class Executed:
    """What :func:`execute` measured and wrote: both models' metrics and completions, the pruned model's
    folder and its reload check."""

    dense: dict[str, Any]
    pruned: dict[str, Any]
    dense_text: list[str]
    pruned_text: list[str]
    model_dir: Path
    reload_check: dict[str, Any]
    distilled: DistillSummary | None = None


def validate(spec: PruneSpec, sources: Sources = _CLI, stages: _Stages | None = None) -> Prepared:
    """Load the model (whole, or its skeleton and a sequential runner: ``options.execution``) and check
    the job against it: the budget, the options, the curve's budgets and the tasks, before any pass."""
    stages = stages or _Stages(None, None)
    evaluation = spec.evaluation
    refusal = execution_refusal(spec.options.execution, len(evaluation.tasks)) or curve_refusal(
        spec.options.heal, evaluation.curve_distill, evaluation.curve_budgets
    )
    if refusal is not None:
        raise InvalidRequestError(refusal[0], field=refusal[1])
    with stages.stage(Stage.loading):
        loaded = _load(
            spec.model, sources, spec.options.execution, working_set(spec.calibration, num_training_windows(spec))
        )
    n_blocks = len(decoder_blocks(loaded.model))
    stages.runner = loaded.runner
    opts = spec.options
    if not spec.target.is_quality_bound:
        validate_budget(n_blocks, spec.target.blocks_for(n_blocks), opts)
    _check_options(n_blocks, spec)
    if spec.evaluation.curve_budgets:
        check_budgets(spec.evaluation.curve_budgets, n_blocks, opts)
    check_tasks(spec.evaluation.tasks)  # an unknown task fails the job before any forward pass
    return Prepared(loaded=loaded, n_blocks=n_blocks)


def _reused(
    precomputed: tuple[SimilarityStats, dict[str, Any]],
    n_blocks: int,
    loaded: LoadedModel,
    spec: CalibrationSpec,
    sources: Sources,
) -> tuple[SimilarityStats, dict[str, Any]]:
    """A stored capture's S and D and their provenance, checked against the model's block count."""
    stats, stored = precomputed
    if stats.num_blocks != n_blocks:
        raise InvalidRequestError(
            f"the stored analysis covers {stats.num_blocks} blocks but the model has {n_blocks}", field="analysis"
        )
    return stats, _reused_provenance(stored, loaded, spec, sources)


def _evaluation_data(loaded: LoadedModel, spec: PruneSpec, sources: Sources) -> tuple[list[str], cal.TokenWindows]:
    """The held-out evaluation texts and their windows."""
    eval_texts = cal.load_texts(
        cal.parse_source(spec.evaluation.dataset), role="evaluation", hub_cache=sources.hub_cache
    )
    eval_windows = cal.evaluation_windows(
        loaded.tokenizer, eval_texts, seq_len=spec.calibration.seq_len, max_windows=spec.evaluation.max_windows
    )
    return eval_texts, eval_windows


def _capture(
    prepared: Prepared,
    data: cal.CalibrationData,
    fit_on: cal.TokenWindows,
    heal: str,
    spec: PruneSpec,
    stages: _Stages,
    sink: StateSink | None,
    folder: Path,
    key: str,
    dense: _DensePass | None = None,
) -> tuple[SimilarityStats, StateStore | None, StateStore | None]:
    """S and D, and in sequential mode the stores the capture wrote its states to (each state as its
    block finishes, so a retry resumes; with a linear heal the heal windows' MLP outputs too, so that
    fits run no block): (stats, states, MLP outputs). In sequential mode the same pass stores the
    validation windows' states and carries the evaluation windows (``dense``)."""
    runner = prepared.loaded.runner
    store = mlp_store = None
    if runner is not None:
        store = window_store(runner, data.capture, folder, key)
        if folds_maps(heal):
            mlp_store = window_store(
                runner, fit_on, folder.with_name(folder.name + "-mlp"), key, num_states=runner.num_blocks
            )
    stats = capture_similarity(
        prepared.run_on,
        data.capture,
        batch_size=spec.calibration.batch_size,
        angular=spec.calibration.angular,
        progress=stages.fraction(Stage.capture),
        should_cancel=stages.should_cancel,
        keep_states=sink,
        store=store,
        mlp_store=mlp_store,
        also=[] if dense is None else [(dense.batches, dense.store)],
        riders=None if dense is None else dense.riders,
    )
    return stats, store, mlp_store


@dataclass
class _DensePass:
    """What a sequential job's dense pass carries besides the capture's windows: the validation windows'
    batches and their state store, and the evaluation windows riding along (:class:`lorp.states.Riders`).
    The capture runs them all, each block loaded once; where a capture is reused, or an attempt resumed
    it past the validation store, the validation windows' own pass finishes them."""

    batches: list[Batch]
    store: StateStore
    riders: Riders | None


def _dense_pass(
    runner: Runner,
    data: cal.CalibrationData,
    eval_windows: cal.TokenWindows | None,
    spec: PruneSpec,
    stages: _Stages,
    scratch: Path,
    key: str,
) -> _DensePass:
    """The validation windows' batches and store, and the evaluation windows as riders where the job
    measures perplexity."""
    batch_size = spec.calibration.batch_size
    riders = None
    if eval_windows is not None and spec.evaluation.perplexity:
        riders = Riders(
            list(runner.batches(eval_windows, batch_size, should_cancel=stages.should_cancel, doing="evaluating"))
        )
    return _DensePass(
        batches=list(runner.batches(data.validation, batch_size, should_cancel=stages.should_cancel)),
        store=window_store(runner, data.validation, scratch / "validation", key),
        riders=riders,
    )


def _stored_caches(
    runner: Runner,
    data: cal.CalibrationData,
    fit_on: cal.TokenWindows,
    heal: str,
    spec: PruneSpec,
    stages: _Stages,
    store: StateStore | None,
    mlp_store: StateStore | None,
    scratch: Path,
    key: str,
    dense: _DensePass,
) -> tuple[StateCache | None, StateCache]:
    """A sequential job's dense-state caches on disk: the heal windows' (read from the capture's store,
    whose first windows they are, when it ran here) and the validation windows' (stored by the capture's
    pass, else by a pass of their own, which the evaluation windows ride where it runs from block 0)."""
    batch_size = spec.calibration.batch_size
    heal_cache: StateCache | None = None
    if folds_maps(heal) and store is not None:
        heal_batches = list(runner.batches(fit_on, batch_size, should_cancel=stages.should_cancel))
        heal_cache = StoredStateCache(store, heal_batches, batch_size, runner.dtype, mlp=mlp_store)
    elif folds_maps(heal):
        heal_cache = stored_cache(
            runner, fit_on, scratch / "heal", key, batch_size=batch_size, should_cancel=stages.should_cancel
        )
    validation_cache = stored_cache(
        runner,
        data.validation,
        scratch / "validation",
        key,
        batch_size=batch_size,
        should_cancel=stages.should_cancel,
        riders=dense.riders,
        store=dense.store,
        batches=dense.batches,
    )
    return heal_cache, validation_cache


def plan(
    prepared: Prepared,
    spec: PruneSpec,
    sources: Sources = _CLI,
    stages: _Stages | None = None,
    lookup_analysis: AnalysisLookup | None = None,
) -> Planned:
    """Build the calibration and evaluation windows, capture S and D (or reuse a stored capture), score
    the candidates and choose the plan, then draw the budget curve; the model is left dense."""
    stages = stages or _Stages(None, None)
    loaded, n_blocks, model = prepared.loaded, prepared.n_blocks, prepared.loaded.model
    with stages.stage(Stage.calibration):
        data = _calibration_data(loaded, spec.calibration, sources, num_training_windows(spec))
        eval_texts, eval_windows = _evaluation_data(loaded, spec, sources)
    fit_on = heal_windows(data.capture, hidden_size(model))
    heal = resolve_heal(model, spec.options.heal, fit_on.num_tokens)  # refuses before the capture
    runner = loaded.runner  # sequential: every cache of dense states lives on disk in the scratch
    batch_size = spec.calibration.batch_size
    sink = StateSink(fit_on.num_windows, batch_size, model.dtype) if folds_maps(heal) and runner is None else None
    fingerprint = calibration_fingerprint(loaded.provenance, data, spec.calibration, sources.analysis_scope)
    key = f"{fingerprint}|batch={batch_size}|{spec.calibration.angular}"
    precomputed = lookup_analysis(fingerprint) if lookup_analysis is not None else None
    resumed_at: int | None = None
    store: StateStore | None = None
    mlp_store: StateStore | None = None
    dense: _DensePass | None = None  # sequential: the validation and evaluation windows' dense pass
    with _capture_scratch(sources) as scratch:
        if precomputed is not None:
            stats, provenance = _reused(precomputed, n_blocks, loaded, spec.calibration, sources)
        else:
            with stages.stage(Stage.capture):
                if runner is not None:
                    dense = _dense_pass(runner, data, eval_windows, spec, stages, scratch, key)
                stats, store, mlp_store = _capture(
                    prepared, data, fit_on, heal, spec, stages, sink, scratch / "capture", key, dense
                )
                resumed_at = store.resumed_from - 1 if store is not None and store.resumed_from else None
            provenance = capture_provenance(loaded, data, spec.calibration, stats, sources)
        provenance = {
            **provenance,
            "libraries": library_versions(),
            "evaluation_text_sha256": assets.texts_sha256(eval_texts),
        }
        with stages.stage(Stage.selection):
            heal_cache: StateCache | None = sink.cache() if sink is not None and sink.windows else None
            validation_cache: StateCache | None = None
            dense_ran: Riders | None = None
            if runner is not None:
                dense = dense or _dense_pass(runner, data, eval_windows, spec, stages, scratch, key)
                heal_cache, validation_cache = _stored_caches(
                    runner, data, fit_on, heal, spec, stages, store, mlp_store, scratch, key, dense
                )
                if dense.riders is not None and dense.riders.finals is not None:
                    dense_ran = dense.riders
            choice = choose_plan(
                prepared.run_on,
                stats.S,
                stats.D,
                data,
                spec,
                n_blocks,
                progress=stages.fraction(Stage.selection),
                should_cancel=stages.should_cancel,
                heal_cache=heal_cache,
                validation_cache=validation_cache,
                spill=scratch / "fits" if runner is not None else None,
            )
            if sources.scratch is None:  # the scratch goes with this call: the chosen maps come along held
                choice.fits = [fit.loaded() for fit in choice.fits]
        teacher: tuple[DenseFinals, DenseFinals] | None = None
        with stages.stage(Stage.budget_curve):
            distil_curve = spec.evaluation.curve_distill and choice.heal == "distill"
            curve = _budget_curve(choice, stats, spec, stages, high=0.5 if distil_curve else 1.0)
            if curve is not None and distil_curve:
                teacher = None if prepared.sequential else _teacher(model, data, spec, stages, choice)
                curve = _distilled_curve(prepared, data, choice, curve, spec, stages, teacher)
    return Planned(
        data=data,
        eval_texts=eval_texts,
        eval_windows=eval_windows,
        stats=stats,
        provenance=provenance,
        reused=precomputed is not None,
        choice=choice,
        curve=curve,
        resumed_at_block=resumed_at,
        teacher=teacher,
        dense_ran=dense_ran,
    )


def execute(
    prepared: Prepared, planned: Planned, spec: PruneSpec, out: Path, stages: _Stages | None = None
) -> Executed:
    """Measure the dense model, apply the plan (heal maps folded, blocks removed), measure the pruned
    model, write it to ``out/model`` and check that it reloads to what was measured.

    Resident: the model in memory is pruned and measured with its own ``forward`` and ``generate``.
    Sequential: the model is never changed; the pruned model is a view the passes take, and what needs
    the model whole (speed, tasks, completions) is skipped (``ExecutionSummary.skipped``)."""
    stages = stages or _Stages(None, None)
    loaded, choice, eval_windows = prepared.loaded, planned.choice, planned.eval_windows
    chosen = choice.chosen
    dense_text: list[str] = []
    pruned_text: list[str] = []
    finals = DenseFinals()  # the dense pass's final states, for the pruned pass's divergence
    taken = PrunedLogits()  # sequential: the pruned pass's logits on its first batch, for the reload check
    teacher: tuple[DenseFinals, DenseFinals] | None = None
    with stages.stage(Stage.evaluating_dense):
        if prepared.sequential:
            dense = _measure_sequential(
                loaded, eval_windows, spec, stages, Stage.evaluating_dense, keep=finals, ran=planned.dense_ran
            )
        else:
            dense, dense_text = _measure(loaded, eval_windows, spec, stages, Stage.evaluating_dense, keep=finals)
        if choice.heal == "distill" and not prepared.sequential:  # what distillation learns, and is judged by
            teacher = planned.teacher or _teacher(loaded.model, planned.data, spec, stages, choice)
    with stages.stage(Stage.pruning):
        if not prepared.sequential:
            model = loaded.model
            anchors = [fit.anchor for fit in choice.fits]
            apply_fits(model, choice.fits, stored_dtypes(loaded.weights, model, anchors) if loaded.weights else None)
            remove_blocks(model, chosen.pruned_layers)
    distilled: DistillSummary | None = None
    replaced: dict[str, torch.Tensor] = {}
    fits: Sequence[FoldedMap] = choice.fits
    if choice.heal == "distill":
        with stages.stage(Stage.distilling):
            if teacher is not None:
                distilled, replaced = _distill(loaded, planned, spec, teacher, stages)
            else:  # sequential: block-local, from the states one pass computes
                distilled, fits = _distill_locally(loaded, planned, spec, stages)
                replaced = pruned_weight_names(loaded.model, chosen.pruned_layers, fits)
    with stages.stage(Stage.evaluating_pruned):
        if prepared.sequential:
            pruned = _measure_sequential(
                loaded,
                eval_windows,
                spec,
                stages,
                Stage.evaluating_pruned,
                chosen.pruned_layers,
                fits,
                against=finals,
                taken=taken,
            )
        else:
            pruned, pruned_text = _measure(loaded, eval_windows, spec, stages, Stage.evaluating_pruned, against=finals)
    model_dir = out / MODEL_SUBDIR
    with stages.stage(Stage.saving):
        _save(loaded, model_dir, chosen.pruned_layers, fits, replaced)
    with stages.stage(Stage.verifying):
        validation = planned.data.validation
        probe = validation.input_ids[:2, : min(32, validation.input_ids.shape[1])]
        if loaded.runner is not None:
            reload_check = verify_reload_sequential(
                model_dir, loaded.runner, probe, chosen.pruned_layers, fits, taken=taken
            )
        elif _second_copy_fits(loaded):
            reload_check = verify_reload(model_dir, loaded.model, probe)
        else:  # the written model, run block by block: one block beside the pruned model, not a second copy
            reload_check = verify_reload_blockwise(model_dir, loaded.model, probe)
    return Executed(dense, pruned, dense_text, pruned_text, model_dir, reload_check, distilled)


def _teacher(
    model: Any, data: cal.CalibrationData, spec: PruneSpec, stages: _Stages, choice: PlanChoice
) -> tuple[DenseFinals, DenseFinals]:
    """The dense model's final states on distillation's training windows (the capture windows and the
    further ones it asked for, ``num_training_windows``) and on the validation windows (what decides
    whether the distilled model ships): two dense passes. The first also keeps the states entering the
    first block the chosen plan's distillation trains (the student starts there), and computes as the
    steps do (``lorp.distill.training_autocast``); the second in the model's own precision."""
    batch_size = spec.calibration.batch_size
    return (
        plan_teacher(
            model, data.training_windows, batch_size, choice.chosen.pruned_layers, [fit.anchor for fit in choice.fits],
            autocast=training_autocast(model), should_cancel=stages.should_cancel,
        ),
        dense_finals(model, data.validation, batch_size, stages.should_cancel),
    )  # fmt: skip


def _training(spec: PruneSpec, stages: _Stages, default_steps: int) -> dict[str, Any]:
    """What a distillation (whole-model or block-local) takes from the job: its steps (``default_steps``
    when unset), batch size, seed and selection metric, and the stage's cancel and progress."""
    return {
        "steps": _heal_steps(spec, default_steps),
        "batch_size": spec.calibration.batch_size,
        "seed": spec.calibration.seed,
        "metric": spec.options.selection_metric,
        "should_cancel": stages.should_cancel,
        "progress": stages.fraction(Stage.distilling),
    }


def _distill(
    loaded: LoadedModel, planned: Planned, spec: PruneSpec, teacher: tuple[DenseFinals, DenseFinals], stages: _Stages
) -> tuple[DistillSummary, dict[str, torch.Tensor]]:
    """Distil the pruned model in memory (``lorp.distill``); where the distilled model ships, its changed
    weights rounded to the dtypes the checkpoint stores (the model measured is the model written), by
    their names in the pruned checkpoint."""
    choice, model = planned.choice, loaded.model
    removed = sorted(choice.chosen.pruned_layers)
    anchors = pruned_anchors([fit.anchor for fit in choice.fits], removed)
    summary = distill(
        model,
        planned.data.training_windows,
        teacher[0],
        planned.data.validation,
        teacher[1],
        anchors=anchors,
        autocast=training_autocast(model),
        **_training(spec, stages, DEFAULT_HEAL_STEPS),
    )
    if summary.shipped != "distill":
        return summary, {}
    weights = distilled_weights(model, summary.blocks, anchors)
    if loaded.weights is not None:
        stored = stored_tensor_dtypes(loaded.weights, removed, weights)
        for name, weight in weights.items():
            weight.data = weight.data.to(stored.get(name, weight.dtype)).to(weight.dtype)
    return summary, weights


def _distill_locally(
    loaded: LoadedModel, planned: Planned, spec: PruneSpec, stages: _Stages
) -> tuple[DistillSummary, list[FoldedMap]]:
    """Sequential execution's distillation (``lorp.local_distill``): each cut's anchor block learns the
    dense span's output; the fits that ship (trained, or the linear heal's as they were)."""
    assert loaded.runner is not None
    return distill_locally(
        loaded.runner,
        planned.data.capture,
        planned.data.validation,
        removed=planned.choice.chosen.pruned_layers,
        fits=planned.choice.fits,
        **_training(spec, stages, DEFAULT_LOCAL_HEAL_STEPS),
    )


def _draw_charts(
    out: Path, planned: Planned, executed: Executed, spec: PruneSpec, sources: Sources, n_blocks: int
) -> dict[str, str]:
    """The heat map, the plans compared and (when drawn) the budget curve; the report's file names."""
    choice, curve, n = planned.choice, planned.curve, planned.choice.n
    chosen, chosen_name, structure = choice.chosen, choice.chosen_name, choice.chosen.structure
    dense, pruned = executed.dense, executed.pruned
    plot_heatmap(
        out / "heatmap.png",
        planned.stats.S,
        clusters=structure.clusters,
        pruned=chosen.pruned_layers,
        healed=[(fit.span.start, fit.span.end) for fit in choice.fits],
        title=_heatmap_title(
            sources.model_name or spec.model.id,
            spec.method,
            chosen_name,
            chosen.pruned_layers,
            healed=bool(choice.fits),
        ),
    )
    pruned_tasks = {(t["task"], t["metric"]): t["value"] for t in pruned.get("tasks", [])}
    by_kl = choice.metric == "kl"  # the candidates drawn by what chose among them
    plot_plans(
        out / "plans.png",
        choice.kl if by_kl else choice.scores,
        measure="validation mean KL from the dense model (nats)" if by_kl else "validation perplexity",
        chosen=chosen_name,
        tasks=[
            (f"{t['task']} {t['metric']}", t["value"], pruned_tasks.get((t["task"], t["metric"])))
            for t in dense.get("tasks", [])
        ],
        title=f"{spec.method}: {chosen_name} removes {len(chosen.pruned_layers)} of {n_blocks} blocks",
    )
    files = {"model": MODEL_SUBDIR, "analysis": "analysis.npz", "heatmap": "heatmap.png", "plans": "plans.png"}
    if curve is not None:
        plot_budget_curve(
            out / "budgets.png",
            curve,
            chosen=(chosen_name, n, choice.scores[chosen_name]),
            title=f"{spec.method}: each method's plan by blocks removed ({n_blocks}-block model)",
        )
        files["budget_curve"] = "budgets.png"
    return files


def _metrics(dense: dict[str, Any], pruned: dict[str, Any], n_blocks: int, n: int) -> Metrics:
    """The dense and pruned measurements with their speed-ups (where both were measured) and bound."""
    metrics = Metrics(dense=dense, pruned=pruned, speedup_bound=n_blocks / (n_blocks - n))
    if "decode_tokens_per_s" in dense and "decode_tokens_per_s" in pruned:
        metrics = dataclasses.replace(
            metrics,
            decode_speedup=pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"],
            prefill_speedup=pruned["prefill_tokens_per_s"] / dense["prefill_tokens_per_s"],
        )
    return metrics


def report(
    prepared: Prepared,
    planned: Planned,
    executed: Executed,
    spec: PruneSpec,
    out: Path,
    sources: Sources = _CLI,
    stages: _Stages | None = None,
) -> PruneReport:
    """Write ``analysis.npz``, the charts and ``report.json`` from the phases' results; returns the report."""
    stages = stages or _Stages(None, None)
    stats, choice, curve, n_blocks = planned.stats, planned.choice, planned.curve, prepared.n_blocks
    chosen, chosen_name, n = choice.chosen, choice.chosen_name, choice.n
    dense, pruned = executed.dense, executed.pruned
    with stages.stage(Stage.reporting):
        structure = chosen.structure
        save_analysis(out / "analysis.npz", stats.S, stats.D)
        files = _draw_charts(out, planned, executed, spec, sources, n_blocks)
        files["model_card"] = f"{MODEL_SUBDIR}/{CARD_FILE}"
        metrics = _metrics(dense, pruned, n_blocks, n)
        prompts = [] if prepared.sequential else list(spec.evaluation.prompts)
        result = PruneReport(
            request=_public_request(spec, sources),
            provenance=planned.provenance,
            analysis_reused=planned.reused,
            analysis=StructureSummary(
                num_blocks=n_blocks,
                num_tokens=stats.num_tokens,
                rls=structure.rls,
                k=structure.k,
                clusters=list(structure.clusters),
                redundancy=list(structure.redundancy),
            ),
            num_layers_removed=n,
            method=spec.method,
            chosen=ChosenPlan(candidate=chosen_name, pruned_layers=list(chosen.pruned_layers)),
            plans={
                name: PlanScore(
                    pruned_layers=list(sel.pruned_layers),
                    k=sel.structure.k if name != "search" else None,
                    validation_perplexity=choice.scores.get(name),
                    validation_kl=choice.kl.get(name),
                )
                for name, sel in choice.plans.items()
            },
            metrics=metrics,
            reload_check=executed.reload_check,
            timings_s=stages.timings,
            files=files,
            heal=_heal_summary(choice, executed.distilled),
            selection=_selection_summary(choice),
            generations=[
                Generation(prompt=prompt, dense=d, pruned=p)
                for prompt, d, p in zip(prompts, executed.dense_text, executed.pruned_text, strict=True)
            ],
            budget_curve=curve,
            execution=_execution_summary(
                prepared.loaded, spec, executed.reload_check, stages.block_loads, planned.resumed_at_block
            ),
        )
        write_report(out / "report.json", result.to_json())
        write_model_card(executed.model_dir, result)
    return result


def run_prune(
    spec: PruneSpec,
    out_dir: str | Path,
    *,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    lookup_analysis: AnalysisLookup | None = None,
    sources: Sources | None = None,
) -> PruneResult:
    """Run a whole pruning job and write its outputs into ``out_dir``: :func:`validate`, :func:`plan`,
    :func:`execute`, :func:`report`.

    Outputs: ``model/`` (the pruned Hugging Face directory, safetensors, with its own model card
    ``README.md`` and ``pruning.json``, ``lorp.model_card``), ``analysis.npz`` (S, D),
    ``report.json`` (request, provenance, analysis, every plan, the chosen one, metrics, the budget
    curve), ``heatmap.png``, ``plans.png`` (the candidates compared) and ``budgets.png`` (the budget
    curve, unless ``evaluation.curve_budgets`` is ``[]``).

    Args:
        spec: The job.
        out_dir: Output directory, missing or empty.
        progress: Called as ``progress(stage, fraction_of_stage)``; stages are ``STAGES``.
        should_cancel: Checked between stages and batches; True raises ``JobCancelled``.
        lookup_analysis: Called with the calibration fingerprint once the calibration data is
            built; when it returns (stats, provenance) of an earlier capture with that fingerprint,
            the capture is skipped (the report says ``analysis_reused``).
        sources: How the caller resolved the references (:class:`Sources`): the kind of model, the
            roots it must stay in, and the names the report shows; the CLI's by default.
    """
    sources = sources or _CLI
    stages = _Stages(progress, should_cancel)
    out = _prepare_out_dir(out_dir)
    prepared = validate(spec, sources, stages)
    with _capture_scratch(sources) as scratch:  # one scratch for the job: the chosen maps wait there
        planned = plan(prepared, spec, dataclasses.replace(sources, scratch=scratch), stages, lookup_analysis)
        executed = execute(prepared, planned, spec, out, stages)
    result = report(prepared, planned, executed, spec, out, sources, stages)
    chosen = planned.choice.chosen
    log.info(
        "pruned %s: removed %s -> %s", sources.model_name or spec.model.id, chosen.pruned_layers, executed.model_dir
    )
    return PruneResult(out_dir=out, model_dir=executed.model_dir, report=result, stats=planned.stats, selection=chosen)
