"""Choosing the plan relative to one capture, on the demo model, resident and sequential.

Each run is a whole job (``lorp.pipeline.run_prune``: method auto, healed, 32 x 256 built-in
calibration tokens, no evaluation and no budget curve) and reads its stage timings: ``capture`` (S
and D, the heal windows' states kept) and ``selection`` (the validation windows' states, the heal
fits, the candidates' scores). Three ways, side by side in one run at each budget:

- resident, as jobs choose now: every candidate screened on the first validation windows, the best
  ``lorp.planner.AUTO_FINALISTS`` distinct plans measured on every window;
- resident, every candidate measured on every window (how auto chose before; the bench sets
  ``AUTO_FINALISTS`` above the candidate count), for the plan it would have chosen;
- sequential (one block loaded at a time from the demo model saved as safetensors), as jobs choose now;
- with ``--search``, the greedy search (``method: search``) sequential: its block loads and its cost
  relative to the capture (the search's cost in block loads grows with its depth, not with its
  candidates times its depth: each step's candidates share one pass over the blocks); run once per
  budget, it is the longest.

Each way runs ``--repeats`` times; the table gives medians (the capture's own time varies by a
third from run to run on this shared machine, and the ratio with it).

Target (issue 21): choosing <= 2.5 x the capture, in both modes, the same plan chosen as before.

    python scripts/bench_choice.py [--budgets 4 8] [--repeats 3] [--search] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchdemo import demo_model  # noqa: E402
from benchdoc import CHOICE_HEADING, replace_section  # noqa: E402

from lorp import planner  # noqa: E402
from lorp.pipeline import run_prune  # noqa: E402
from lorp.spec import (  # noqa: E402
    CalibrationSpec,
    EvaluationSpec,
    ModelSpec,
    PruneSpec,
    SelectionOptions,
    TargetSpec,
)

WAYS = ("resident, screened", "resident, every candidate", "sequential, screened")


def demo_folder() -> Path:
    """The demo model as a safetensors folder (what a sequential job reads a block at a time)."""
    folder = REPO / "var" / "bench" / "demo-safetensors"
    if not (folder / "config.json").is_file():
        loaded = demo_model()
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return folder


def run(folder: Path, way: str, n: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    spec = PruneSpec(
        model=ModelSpec(id=str(folder), device="cpu"),
        method="search" if "search" in way else "auto",
        target=TargetSpec(num_layers=n),
        calibration=CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4),
        evaluation=EvaluationSpec(perplexity=False, speed=False, curve_budgets=[], prompts=[]),
        options=SelectionOptions(heal="linear", execution="sequential" if way.startswith("sequential") else "resident"),
    )
    finalists = planner.AUTO_FINALISTS
    if way == "resident, every candidate":
        planner.AUTO_FINALISTS = 10**6
    try:
        report = run_prune(spec, out).report
    finally:
        planner.AUTO_FINALISTS = finalists
    timings, selection = report.timings_s, report.selection
    assert selection is not None
    return {
        "capture_s": timings["capture"],
        "choose_s": timings["selection"],
        "plan": list(report.chosen.pruned_layers),
        "candidate": report.chosen.candidate,
        "evaluations": selection.evaluations,
        "screenings": selection.screenings,
        "heal_fits": selection.heal_fits,
        "block_loads": report.execution.block_loads if report.execution is not None else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--search", action="store_true", help="add the greedy search, sequential")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    folder = demo_folder()
    ways = [*WAYS, *(["sequential, search"] if args.search else [])]
    rows = []
    ratios: dict[str, list[float]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="bench-choice-", dir=REPO / "var") as scratch:
        for n in args.budgets:
            found: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
            for repeat in range(args.repeats):  # the ways interleaved, so that a slow spell hits them alike
                for i, way in enumerate(ways):
                    if "search" in way and repeat > 0:  # one search run per budget: it is the longest
                        continue
                    found[way].append(run(folder, way, n, args, Path(scratch) / f"{n}-{repeat}-{i}"))
            before = found["resident, every candidate"][0]["plan"]
            for way, runs in found.items():
                capture = statistics.median(r["capture_s"] for r in runs)
                choose = statistics.median(r["choose_s"] for r in runs)
                ratio = statistics.median(r["choose_s"] / r["capture_s"] for r in runs)
                ratios[way].append(ratio)
                got = runs[0]
                same = all(r["plan"] == got["plan"] for r in runs)
                loads = got["block_loads"] if way.startswith("sequential") else "-"
                rows.append(
                    f"| {n} | {way} | {capture:.1f} | {choose:.1f} | **{ratio:.2f}** "
                    f"| {min(r['choose_s'] / r['capture_s'] for r in runs):.2f} - "
                    f"{max(r['choose_s'] / r['capture_s'] for r in runs):.2f} "
                    f"| {got['evaluations']} / {got['screenings']} / {got['heal_fits']} | {loads} "
                    f"| {got['candidate']} {got['plan']}{'' if same else ' (varied)'} "
                    f"| {'yes' if got['plan'] == before else 'no'} |"
                )
                print(rows[-1], flush=True)
    medians = ", ".join(f"{way} {statistics.median(r):.2f}" for way, r in ratios.items())
    command = "python scripts/bench_choice.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = [
        CHOICE_HEADING,
        "",
        f"Recorded {started_at} by `{command.strip()}` ({platform.machine()}, {torch.get_num_threads()} threads, "
        f"CPU float32, torch {torch.__version__}). Demo model (30 blocks), healed, {args.num_samples} x "
        f"{args.seq_len} built-in calibration tokens (16 validation windows); each row is a whole job's stage "
        "timings: choosing is the selection stage (the validation windows' states, the heal fits of every "
        "candidate's spans, the scores; for the search, its steps too), relative to the same job's capture, the "
        f"median of {args.repeats} run(s) with the ways interleaved (range: the lowest and highest ratio). "
        "Target: <= 2.5.",
        "",
        "| blocks | how | capture s | choosing s | choosing / capture | range | full measures / screenings / "
        "heal fits | block loads (whole job) | chosen | same plan as every-candidate |",
        "|---:|---|---:|---:|---:|---|---:|---:|---|---|",
        *rows,
        "",
        f"Medians of choosing / capture over the budgets: {medians}.",
    ]
    print("\n".join(section))
    replace_section(args.out, CHOICE_HEADING, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
