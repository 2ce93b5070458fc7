"""docs/benchmarks.md is written by several scripts, each owning its ``## `` sections.

``replace_section`` swaps one section in place (or appends it); ``other_sections`` gives back the
sections a full rewrite by ``bench.py`` must keep: every ``## `` section it does not write itself, whether
another script wrote it or a person did (notes on how a default was chosen).
"""

from __future__ import annotations

from pathlib import Path

WORKER_HEADING = "## Worker: how a job's process starts"  # scripts/bench_worker.py
API_HEADING = "## API: server-side cost of a poll"  # scripts/bench_api.py
HEAL_HEADING = "## Healing a cut: held-out perplexity unhealed vs healed"  # scripts/bench_heal.py
PLANS_HEADING = "## Healed and searched plans: held-out perplexity and cost"  # scripts/bench_plans.py
# scripts/bench_divergence.py
DIVERGENCE_HEADING = "## Every training-free plan by divergence from the dense model, and what distillation ships"
TASKS_HEADING = "## Downstream: the built-in task, dense and pruned"  # scripts/bench_tasks.py
CURVE_HEADING = "## The budget curve: each method by blocks removed, and its cost"  # scripts/bench_curve.py
CHECKPOINT_HEADING = "## Writing the pruned checkpoint: streamed vs from memory"  # scripts/bench_checkpoint.py
EXECUTION_HEADING = "## Sequential vs resident: a whole job on a 4.7 GB model"  # scripts/bench_execution.py
CHOICE_HEADING = "## Choosing the plan relative to one capture"  # scripts/bench_choice.py
GPU_HEADING = "## On a GPU: a whole job on a model of Llama-3.1-8B's shape"  # scripts/bench_gpu.py
MOE_HEADING = "## Healing a mixture of experts: the demo model and a Mixtral made from it"  # scripts/bench_moe.py
MOE_DISTILL_HEADING = "## Distilling a mixture of experts: adapters on the experts"  # scripts/bench_moe_distill.py


def distill_heading(method: str) -> str:
    """scripts/bench_distill.py's section for one method's plans (auto's and search's are recorded apart,
    so either can be run again alone)."""
    return f"## Healing by distillation, {method}'s plan: none, linear and distill side by side"


def _span(lines: list[str], heading: str) -> tuple[int, int] | None:
    start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end


def replace_section(out: Path, heading: str, section: list[str]) -> None:
    """Put ``section`` (starting with ``heading``) in place of the file's section of that heading."""
    lines = out.read_text().splitlines() if out.is_file() else []
    section = section if section and not section[-1] else [*section, ""]  # a blank line before the next
    span = _span(lines, heading)
    if span is None:
        lines += ["", *section]
    else:
        lines[span[0] : span[1]] = section
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


def section_lines(out: Path, heading: str) -> list[str]:
    """The lines of the file's section of that heading, heading included (empty when it has none)."""
    lines = out.read_text().splitlines() if out.is_file() else []
    span = _span(lines, heading)
    return lines[span[0] : span[1]] if span else []


def other_sections(out: Path, rewritten: tuple[str, ...]) -> list[str]:
    """The lines of the file's ``## `` sections whose heading starts with none of ``rewritten``, in file
    order (empty when there is no file): what a rewrite of the ``rewritten`` sections keeps."""
    lines = out.read_text().splitlines() if out.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]
    kept: list[str] = []
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        if not lines[start].startswith(rewritten):
            kept += lines[start:end]
    return kept
