"""The budget curve on the demo model: what each method's plan scores by blocks removed, and what the
curve costs beside choosing the plan.

For each job budget n, one capture, then ``choose_plan`` (method auto, healed, as a default job)
and the default budget curve (``lorp.curve``: up to four budgets over 1..n) from the same scorer,
as ``lorp.pipeline`` runs them. Prints the curve at the largest n and the seconds of each step;
writes its section of docs/benchmarks.md.

    python scripts/bench_curve.py [--budgets 4 8] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchdemo import demo_calibration, demo_model  # noqa: E402
from benchdoc import CURVE_HEADING, replace_section  # noqa: E402

from lorp.blocks import decoder_blocks  # noqa: E402
from lorp.curve import budget_curve, default_budgets  # noqa: E402
from lorp.planner import choose_plan, heal_windows, hidden_size  # noqa: E402
from lorp.selection import SelectionOptions, analyze_structure  # noqa: E402
from lorp.similarity import capture_similarity  # noqa: E402
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, TargetSpec  # noqa: E402
from lorp.states import StateSink  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    loaded = demo_model()
    model = loaded.model
    n_blocks = len(decoder_blocks(model))
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    data = demo_calibration(loaded.tokenizer, calibration)
    options = SelectionOptions(heal="linear")
    costs = []
    curve = None
    for n in args.budgets:
        sink = StateSink(heal_windows(data.capture, hidden_size(model)).num_windows, 4, model.dtype)
        started = time.perf_counter()
        stats = capture_similarity(model, data.capture, batch_size=4, keep_states=sink)
        capture_s = time.perf_counter() - started
        spec = PruneSpec(
            model=ModelSpec(id="demo"), target=TargetSpec(num_layers=n), calibration=calibration, options=options
        )
        started = time.perf_counter()
        choice = choose_plan(model, stats.S, stats.D, data, spec, n_blocks, heal_cache=sink.cache())
        choose_s = time.perf_counter() - started
        assert choice.scorer is not None
        evaluations = choice.scorer.evaluations
        started = time.perf_counter()
        budgets = default_budgets(n)
        structure = analyze_structure(stats.S, options)
        curve = budget_curve(choice.scorer, stats.S, stats.D, budgets, options, structure)
        curve_s = time.perf_counter() - started
        new = choice.scorer.evaluations - evaluations
        costs.append((n, budgets, len(curve.points), new, capture_s, choose_s, curve_s, choice.chosen_name))
        print(costs[-1], flush=True)
    assert curve is not None

    points = {(p.method, p.budget): p.validation_perplexity for p in curve.points}
    budgets = sorted({p.budget for p in curve.points})
    section = [
        CURVE_HEADING,
        "",
        f"Recorded {started_at} by `python scripts/bench_curve.py --budgets {' '.join(map(str, args.budgets))}` "
        f"({platform.machine()}, CPU float32, torch {torch.__version__}). Demo model ({n_blocks} blocks), "
        f"{args.num_samples} x {args.seq_len} calibration tokens, method auto healed; the default curve budgets "
        "(up to four over 1..n), scored on the job's validation windows by the scorer that chose the plan. "
        "A plan the job already scored is not measured again, so the curve's cost is its new plans "
        "(the dense reference among them).",
        "",
        "| job budget | curve budgets | points | new plans scored | capture s | choosing the plan s | curve s "
        "| curve / choosing |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, bs, count, new, capture_s, choose_s, curve_s, _ in costs:
        section.append(
            f"| {n} | {bs} | {count} | {new} | {capture_s:.1f} | {choose_s:.1f} | {curve_s:.1f} "
            f"| {curve_s / choose_s:.2f} |"
        )
    section += [
        "",
        f"The curve at {args.budgets[-1]} of {n_blocks} (validation perplexity, healed; dense "
        f"{curve.dense_validation_perplexity:.2f}; auto shipped `{costs[-1][-1]}`):",
        "",
        "| method | " + " | ".join(f"{b} blocks" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for method in dict.fromkeys(p.method for p in curve.points):
        cells = [f"{points[(method, b)]:.2f}" if (method, b) in points else "-" for b in budgets]
        section.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\n".join(section))
    replace_section(args.out, CURVE_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
