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

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from lorp.assets.cache import cache_dir
from lorp.assets.cloze import TASK_NAME as BUILTIN_TASK
from lorp.assets.cloze import builtin_task_dir
from lorp.atomic import write_atomically
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
def _task_manager(include: tuple[str, ...], version: str) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=True)


def task_manager() -> Any:
    """lm-eval's task index: its registry, the operator's folder and the built-in task (kept per process
    while those folders stay the same version, :func:`catalogue`)."""
    include = _include_paths()
    return _task_manager(tuple(str(path) for path in include), _index_version(include))


def _include_paths() -> list[Path]:
    """The folders lm-eval indexes beside its registry: the built-in task's and the operator's; refuses
    when lm-eval is missing or the operator's folder is not one."""
    reason = missing_reason()
    if reason is not None:
        raise InvalidRequestError(reason, field="evaluation.tasks")
    include = [builtin_task_dir()]
    local = local_tasks_dir()
    if local is not None:
        if not local.is_dir():
            raise InvalidRequestError(f"{TASKS_DIR_ENV} names {local}, which is not a folder", field="evaluation.tasks")
        include.append(local)
    return include


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


_INDEX_FORMAT = 1  # bump when what a remembered catalogue holds changes
_INDEX_KEPT = 4  # remembered versions kept, the most recent


def catalogue() -> list[TaskInfo]:
    """Every task and group this worker can run, built-in and local first, then the registry's by name.

    ``metrics`` lists what the task's own YAML declares (empty where it inherits them). Indexing
    lm-eval's registry parses some 15,000 YAML files (7 s on one core here), which a worker did on every
    start, so the catalogue is remembered in the cache folder (``cache_dir()/lm-eval-index/``) per version
    of the folders it is read from: lm-eval's version and, for its task folder, the built-in task's and
    the operator's, every file's path, size and modification time. A file added, removed or changed in
    any of them makes a new version, indexed again; an unreadable remembered one is indexed again too.
    """
    include = _include_paths()
    version = _index_version(include)
    entry = cache_dir() / "lm-eval-index" / f"{version}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return [_remembered(task) for task in json.loads(entry.read_text())]
    manager = _task_manager(tuple(str(path) for path in include), version)
    local = local_tasks_dir()
    infos = [TaskInfo(name, _source(entry, local), _metrics(entry)) for name, entry in manager.task_index.items()]
    order = {"built-in": 0, "local": 1, "hub": 2}
    infos.sort(key=lambda info: (order[info.source], info.name))
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(entry, json.dumps([dataclasses.asdict(info) for info in infos]))
        for stale in sorted(entry.parent.glob("*.json"), key=lambda path: path.stat().st_mtime)[:-_INDEX_KEPT]:
            stale.unlink(missing_ok=True)  # versions no longer read (1.3 MB each here)
    return infos


def _remembered(task: dict[str, Any]) -> TaskInfo:
    if task["source"] not in ("built-in", "local", "hub") or not isinstance(task["metrics"], list):
        raise ValueError(f"not a remembered task: {task!r}")
    return TaskInfo(str(task["name"]), task["source"], [str(metric) for metric in task["metrics"]])


def _index_version(include: Sequence[Path]) -> str:
    """A hex digest naming this version of the task folders (see :func:`catalogue`)."""
    import lm_eval

    digest = hashlib.sha256(f"{_INDEX_FORMAT}\0{importlib.metadata.version('lm_eval')}".encode())
    for folder in [Path(lm_eval.__file__).parent / "tasks", *include]:
        digest.update(f"\0{folder}".encode())
        for directory, dirs, files in os.walk(folder):
            dirs[:] = sorted(name for name in dirs if name != "__pycache__")  # written by running a task
            for name in sorted(files):
                path = os.path.join(directory, name)
                stat = os.stat(path)
                digest.update(f"\0{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


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
