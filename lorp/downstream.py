"""Downstream tasks through lm-evaluation-harness, run on the model in memory.

``run_tasks`` hands the loaded model (dense, or pruned in place) to lm-eval's ``HFLM`` wrapper, so
nothing is loaded twice from disk, and runs one task at a time through ``simple_evaluate``, checking
for cancellation and reporting progress between tasks. Task definitions come from lm-eval's own
registry (their datasets come from the Hugging Face hub, where it is reachable), from the folder of
task YAMLs an operator names in ``LORP_EVAL_TASKS_DIR``, and from the built-in offline cloze task
(``lorp.assets.cloze``). lm-eval is an optional dependency (the ``eval`` extra): this module
imports it only when a task is asked for.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from lorp.assets.cloze import TASK_NAME as BUILTIN_TASK
from lorp.assets.cloze import builtin_task_dir
from lorp.errors import InvalidRequestError, JobCancelled
from lorp.spec import TaskSpec

log = logging.getLogger(__name__)

TASKS_DIR_ENV = "LORP_EVAL_TASKS_DIR"
TaskSource = Literal["built-in", "local", "hub"]
_NOT_METRICS = {"alias", "name", "sample_len", " "}


@dataclass(frozen=True)
class TaskInfo:
    """A task this worker can run: its name, where its definition comes from, and its metrics."""

    name: str
    source: TaskSource
    metrics: list[str]


@dataclass(frozen=True)
class TaskScore:
    """One metric of one task on one model (``task`` is a subtask's name when a group was asked for)."""

    task: str
    metric: str
    value: float
    stderr: float | None
    num_samples: int
    num_fewshot: int | None


def missing_reason() -> str | None:
    """Why downstream tasks cannot run here (lm-eval not installed), or None."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return "lm-evaluation-harness is not installed on this worker (install the project's 'eval' extra)"
    return None


def local_tasks_dir() -> Path | None:
    """The operator's folder of task YAMLs (``LORP_EVAL_TASKS_DIR``), when set."""
    value = os.environ.get(TASKS_DIR_ENV)
    return Path(value).expanduser().resolve() if value else None


@lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=True)


def task_manager() -> Any:
    """lm-eval's task index: its registry, the operator's folder and the built-in task (kept per process)."""
    reason = missing_reason()
    if reason is not None:
        raise InvalidRequestError(reason, field="evaluation.tasks")
    include = [str(builtin_task_dir())]
    local = local_tasks_dir()
    if local is not None:
        if not local.is_dir():
            raise InvalidRequestError(f"{TASKS_DIR_ENV} names {local}, which is not a folder", field="evaluation.tasks")
        include.append(str(local))
    return _task_manager(tuple(include))


def _source(entry: Any, local: Path | None) -> TaskSource:
    path = getattr(entry, "yaml_path", None)
    name = getattr(entry, "name", "")
    if name == BUILTIN_TASK:
        return "built-in"
    if path is not None and local is not None and Path(path).resolve().is_relative_to(local):
        return "local"
    return "hub"


def _metrics(entry: Any) -> list[str]:
    config = getattr(entry, "cfg", None) or {}
    listed = config.get("metric_list") if isinstance(config, dict) else None
    if not isinstance(listed, list):
        return []
    return [str(m["metric"]) for m in listed if isinstance(m, dict) and isinstance(m.get("metric"), str)]


def catalogue() -> list[TaskInfo]:
    """Every task and group this worker can run, built-in and local first, then the registry's by name.

    ``metrics`` lists what the task's own YAML declares (empty where it inherits them).
    """
    manager = task_manager()
    local = local_tasks_dir()
    infos = [TaskInfo(name, _source(entry, local), _metrics(entry)) for name, entry in manager.task_index.items()]
    order = {"built-in": 0, "local": 1, "hub": 2}
    return sorted(infos, key=lambda info: (order[info.source], info.name))


def check_tasks(tasks: Sequence[TaskSpec]) -> None:
    """Refuse, naming the field, a task this worker does not know (before any model work)."""
    if not tasks:
        return
    manager = task_manager()
    known = set(manager.task_index)
    for i, task in enumerate(tasks):
        if task.name not in known:
            raise InvalidRequestError(
                f"unknown task {task.name!r}: not in lm-eval's registry, the built-in tasks ({BUILTIN_TASK}) "
                f"or {TASKS_DIR_ENV}",
                field=f"evaluation.tasks.{i}.name",
            )


def _scores(results: dict[str, Any], fewshot: int | None) -> list[TaskScore]:
    out: list[TaskScore] = []
    samples = results.get("n-samples", {})
    shots = results.get("n-shot", {})
    for task, values in results.get("results", {}).items():
        count = samples.get(task, {}).get("effective", 0) if isinstance(samples.get(task), dict) else 0
        for key, value in values.items():
            metric, _, _filter = str(key).partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{_filter}") if _filter else values.get(f"{metric}_stderr")
            shot = shots.get(task, fewshot)
            out.append(
                TaskScore(
                    task=str(task),
                    metric=metric if _filter in ("", "none") else f"{metric},{_filter}",
                    value=float(value),
                    stderr=float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None,
                    num_samples=int(count),
                    num_fewshot=int(shot) if isinstance(shot, int) else fewshot,
                )
            )
    return out


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[TaskSpec],
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[list[TaskScore], float]:
    """Run each task on ``model`` as it is now; returns the scores and the seconds lm-eval took.

    Args:
        model: a loaded causal LM (dense, or pruned in place), in eval mode.
        tokenizer: its tokenizer.
        tasks: the tasks, each with its own ``limit`` and ``num_fewshot``.
        batch_size: sequences per forward pass.
        progress: called as ``progress(tasks_done, tasks_total)``.
        should_cancel: checked before each task.
    """
    if not tasks:
        return [], 0.0
    check_tasks(tasks)
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    manager = task_manager()
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    scores: list[TaskScore] = []
    started = time.perf_counter()
    for i, task in enumerate(tasks):
        if should_cancel is not None and should_cancel():
            raise JobCancelled("the job was cancelled while running downstream tasks")
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=[task.name],
            num_fewshot=task.num_fewshot,
            limit=task.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=1000,
        )
        if results is None:  # lm-eval returns None on ranks other than 0; there is only one here
            raise RuntimeError(f"lm-eval returned no results for task {task.name!r}")
        scores.extend(_scores(results, task.num_fewshot))
        if progress is not None:
            progress(i + 1, len(tasks))
    return scores, time.perf_counter() - started
