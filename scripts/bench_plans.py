"""Healed and searched plans on the demo model: held-out perplexity and cost, side by side in one run.

At each budget, on the same held-out windows of the built-in evaluation text: every one-pass method's
plan removed as it is and healed (``options.heal``), ``auto`` unhealed and healed, ``search``
unhealed and healed, each choice made the way a job makes it (``lorp.planner.choose_plan``, the
heal states kept from the capture). Costs are wall time relative to one capture of the same
calibration windows, measured right before each budget's runs (the machine is shared). Then a
quality target: ``max_perplexity_ratio`` 1.5 with ``auto`` healed, the budget it chose, and the
held-out ratio that gave. Writes its section of docs/benchmarks.md.

    python scripts/bench_plans.py [--budgets 2 4 6 8 10] [--num-samples 32] [--eval-windows 8]
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

from benchdemo import demo_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import PLANS_HEADING, replace_section  # noqa: E402

from lorp.blocks import decoder_blocks, pruned_view  # noqa: E402
from lorp.evaluation import perplexity  # noqa: E402
from lorp.execution import folded  # noqa: E402
from lorp.planner import choose_plan, heal_windows, hidden_size  # noqa: E402
from lorp.scoring import CachedHealer  # noqa: E402
from lorp.selection import candidate_plans  # noqa: E402
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec  # noqa: E402

ONE_PASS = ("lorp", "shortgpt", "streamline", "angular", "reverse")


class HeldOut:
    """Held-out perplexity of (plan, fits), each distinct one measured once."""

    def __init__(self, model, windows, batch_size: int) -> None:
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self._seen: dict[tuple, float] = {}

    def __call__(self, plan, fits=()) -> float:
        key = (tuple(plan), tuple((f.anchor, f.span.end, float(f.T.sum())) for f in fits))
        if key not in self._seen:
            with folded(self.model, fits), pruned_view(self.model, plan):
                self._seen[key] = perplexity(self.model, self.windows, batch_size=self.batch_size)
        return self._seen[key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 6, 8, 10])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--quality-ratio", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    loaded = demo_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    n_blocks = len(decoder_blocks(model))
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    data = demo_calibration(tokenizer, calibration)
    held_out = HeldOut(model, held_out_windows(tokenizer, args.eval_len, args.eval_windows), args.batch_size)
    dense = held_out([])

    def capture():
        return timed_capture(model, data.capture, args.batch_size)

    def job(method: str, heal: str, target: TargetSpec):
        spec = PruneSpec(
            model=ModelSpec(id="demo"),
            method=method,  # type: ignore[arg-type]
            target=target,
            calibration=calibration,
            options=SelectionOptions(heal=heal),  # type: ignore[arg-type]
        )
        started = time.perf_counter()
        choice = choose_plan(model, stats.S, stats.D, data, spec, n_blocks, heal_cache=heal_cache)
        return choice, time.perf_counter() - started

    rows = []
    for n in args.budgets:
        stats, heal_cache, capture_s = capture()
        result: dict[str, tuple[list[int], float, float, float, float]] = {}
        plans = candidate_plans(stats.S, stats.D, n, SelectionOptions())
        for method in ONE_PASS:
            plan = plans[method].pruned_layers
            healer = CachedHealer(model, heal_cache, mode="dense")
            started = time.perf_counter()
            fits = healer.fits(plan)
            fit_s = time.perf_counter() - started
            result[method] = (plan, held_out(plan), held_out(plan, fits), 0.0, fit_s / capture_s)
        for method in ("auto", "search"):
            plain, plain_s = job(method, "none", TargetSpec(num_layers=n))
            healed, healed_s = job(method, "linear", TargetSpec(num_layers=n))
            result[method] = (
                healed.chosen.pruned_layers,
                held_out(plain.chosen.pruned_layers),
                held_out(healed.chosen.pruned_layers, healed.fits),
                plain_s / capture_s,
                healed_s / capture_s,
            )
        best_unhealed = min(result[m][1] for m in ONE_PASS)
        rows.append((n, capture_s, result, best_unhealed))
        print(n, {k: (v[0], round(v[1], 2), round(v[2], 2), round(v[3], 1), round(v[4], 1)) for k, v in result.items()})
        print(f"  best one-pass unhealed {best_unhealed:.2f}", flush=True)

    stats, heal_cache, capture_s = capture()
    quality, quality_s = job("auto", "linear", TargetSpec(max_perplexity_ratio=args.quality_ratio))
    q = quality.quality
    assert q is not None
    quality_held_out = held_out(quality.chosen.pruned_layers, quality.fits) / dense

    heal_tokens = heal_windows(data.capture, hidden_size(model)).num_tokens
    section = [
        PLANS_HEADING,
        "",
        f"Recorded {started_at} by `python scripts/bench_plans.py --budgets {' '.join(map(str, args.budgets))} "
        f"--num-samples {args.num_samples} --seq-len {args.seq_len} --eval-windows {args.eval_windows} "
        f"--eval-len {args.eval_len}` ({platform.machine()}, CPU float32, torch {torch.__version__}). Demo model "
        f"(30 blocks); calibration {args.num_samples} x {args.seq_len} built-in tokens (heal maps fitted on "
        f"{heal_tokens:,} of them, plans validated on {data.validation.num_windows} held-out "
        f"calibration windows); held-out perplexity on {args.eval_windows} x {args.eval_len} tokens of the built-in "
        f"evaluation text (dense {dense:.2f}). Each cell: held-out perplexity unhealed / healed. Cost: wall time "
        "of choosing (and healing) relative to one capture measured just before, unhealed / healed.",
        "",
        "| blocks | " + " | ".join(ONE_PASS) + " | auto | search | auto cost | search cost |",
        "|---:|" + "---:|" * (len(ONE_PASS) + 4),
    ]
    for n, _, result, _ in rows:
        cells = [f"{result[m][1]:.2f} / {result[m][2]:.2f}" for m in (*ONE_PASS, "auto", "search")]
        costs = [f"{result[m][3]:.1f} / {result[m][4]:.1f}" for m in ("auto", "search")]
        section.append(f"| {n} | " + " | ".join(cells + costs) + " |")
    section += [
        "",
        "Targets, as ratios to the best unhealed one-pass plan on the same held-out windows:",
        "",
        "| blocks | best one-pass, unhealed | auto healed | ratio (target <= 0.85 at 4-10) | search healed | "
        "ratio (target <= 0.70 at 6-10) | search cost, x capture (target <= 10) | search's plan |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, _, result, best in rows:
        auto_ratio, search_ratio = result["auto"][2] / best, result["search"][2] / best
        section.append(
            f"| {n} | {best:.2f} | {result['auto'][2]:.2f} | {auto_ratio:.2f} | {result['search'][2]:.2f} | "
            f"{search_ratio:.2f} | {result['search'][4]:.1f} | {result['search'][0]} |"
        )
    after = f"{q.next_value:.3f}" if q.next_value is not None else "none (nothing more to remove)"
    section += [
        "",
        f"Quality target `max_perplexity_ratio` {args.quality_ratio} (auto, healed): chose {q.num_layers} blocks "
        f"{quality.chosen.pruned_layers} ({quality.chosen_name}); validation ratio {q.value:.3f}, one block more "
        f"{after}; held-out ratio {quality_held_out:.3f}; cost {quality_s / capture_s:.1f} x capture.",
    ]
    print("\n".join(section))
    replace_section(args.out, PLANS_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
