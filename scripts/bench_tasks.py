"""Downstream accuracy on the built-in task (lorp_cloze, through lm-evaluation-harness) on the demo model.

At each budget, the plan of every one-pass method removed as it is, and the plans ``auto`` and
``search`` choose with healing (as a default job ships them), each scored on the same items; the
dense model once. The time lm-eval took is given relative to one capture of the calibration windows
measured in the same run. Writes its section of docs/benchmarks.md.

    python scripts/bench_tasks.py [--budgets 4 8] [--limit 100] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchdemo import demo_calibration, demo_model  # noqa: E402
from benchdoc import TASKS_HEADING, replace_section  # noqa: E402

from lorp.assets.cloze import TASK_NAME  # noqa: E402
from lorp.blocks import decoder_blocks, pruned_view  # noqa: E402
from lorp.downstream import run_tasks  # noqa: E402
from lorp.execution import folded  # noqa: E402
from lorp.planner import choose_plan, heal_windows, hidden_size  # noqa: E402
from lorp.selection import candidate_plans  # noqa: E402
from lorp.similarity import capture_similarity  # noqa: E402
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec, TaskSpec  # noqa: E402
from lorp.states import StateSink  # noqa: E402

ONE_PASS = ("lorp", "shortgpt", "streamline", "angular", "reverse")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--limit", type=int, default=100, help="items of the built-in task (400 in all)")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    loaded = demo_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    n_blocks = len(decoder_blocks(model))
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    data = demo_calibration(tokenizer, calibration)
    task = [TaskSpec(name=TASK_NAME, limit=args.limit)]
    captures: list[float] = []
    lm_eval_s: list[float] = []

    def accuracy(plan: list[int], fits=()) -> tuple[float, float]:
        with folded(model, fits), pruned_view(model, plan):
            scores, seconds = run_tasks(model, tokenizer, task, batch_size=args.batch_size)
        lm_eval_s.append(seconds)
        by_metric = {s.metric: s for s in scores}
        return by_metric["acc"].value, by_metric["acc"].stderr or 0.0

    dense = accuracy([])
    rows: dict[int, dict[str, tuple[list[int], float, float]]] = {}
    for n in args.budgets:
        sink = StateSink(heal_windows(data.capture, hidden_size(model)).num_windows, 4, model.dtype)
        started = time.perf_counter()
        stats = capture_similarity(model, data.capture, batch_size=4, keep_states=sink)
        captures.append(time.perf_counter() - started)
        plans = candidate_plans(stats.S, stats.D, n, SelectionOptions())
        rows[n] = {}
        for method in ONE_PASS:
            plan = plans[method].pruned_layers
            rows[n][method] = (plan, *accuracy(plan))
        for method in ("auto", "search"):
            spec = PruneSpec(
                model=ModelSpec(id="demo"),
                method=method,  # type: ignore[arg-type]
                target=TargetSpec(num_layers=n),
                calibration=calibration,
                options=SelectionOptions(heal="linear"),
            )
            choice = choose_plan(model, stats.S, stats.D, data, spec, n_blocks, heal_cache=sink.cache())
            rows[n][f"{method}, healed"] = (
                choice.chosen.pruned_layers,
                *accuracy(choice.chosen.pruned_layers, choice.fits),
            )
        print(n, {k: (v[0], round(v[1], 3)) for k, v in rows[n].items()}, flush=True)

    capture_s = statistics.median(captures)
    names = [*ONE_PASS, "auto, healed", "search, healed"]
    section = [
        TASKS_HEADING,
        "",
        f"Recorded {started_at} by `python scripts/bench_tasks.py --budgets {' '.join(map(str, args.budgets))} "
        f"--limit {args.limit}` ({platform.machine()}, CPU float32, torch {torch.__version__}). Demo model (30 "
        f"blocks); `{TASK_NAME}`, the built-in 4-way next-sentence cloze (chance 0.25), first {args.limit} of its "
        f"400 items, accuracy (`acc`) through lm-evaluation-harness on the model in memory; plans chosen from "
        f"{args.num_samples} x {args.seq_len} calibration tokens as in the section above. Dense: "
        f"{dense[0]:.3f} (stderr {dense[1]:.3f}). One run of lm-eval on the task takes "
        f"{statistics.median(lm_eval_s) / capture_s:.1f} x a capture ({statistics.median(lm_eval_s):.0f} s against "
        f"{capture_s:.1f} s, medians).",
        "",
        "| method | " + " | ".join(f"{n} of {n_blocks}: plan | acc" for n in args.budgets) + " |",
        "|---|" + "---|---:|" * len(args.budgets),
    ]
    for name in names:
        cells = [f"{rows[n][name][0]} | {rows[n][name][1]:.3f}" for n in args.budgets]
        section.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(section))
    replace_section(args.out, TASKS_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
