"""Healing a cut (lorp.heal) on the demo model: held-out perplexity unhealed vs healed, side by side.

For each one-pass plan (ShortGPT, LLM-Streamline) at each budget, on the same held-out windows of
the built-in evaluation text: the pruned model unhealed, healed with spans fitted in depth order on
the model pruned so far (``sequential``), and healed with every span fitted on the dense model
(``dense``). The maps are fitted as a job fits them: ``lorp.scoring.CachedHealer`` on the heal
windows' states kept by the capture (``lorp.states.StateSink``, ``lorp.planner.heal_windows``: every
calibration window at the default 32 x 256 tokens), a fresh healer per plan and mode so that no fit
is reused; each fit's time is relative to that capture, measured in the same run. Writes its section
of docs/benchmarks.md.

    python scripts/bench_heal.py [--budgets 4 8] [--num-samples 32] [--eval-windows 16] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchdemo import capture_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import HEAL_HEADING, replace_section  # noqa: E402

from lorp.blocks import pruned_view  # noqa: E402
from lorp.evaluation import perplexity  # noqa: E402
from lorp.execution import folded  # noqa: E402
from lorp.planner import heal_windows, hidden_size  # noqa: E402
from lorp.scoring import CachedHealer  # noqa: E402
from lorp.selection import select  # noqa: E402

METHODS = ("shortgpt", "streamline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    loaded = demo_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    data = capture_calibration(tokenizer, args.num_samples, args.seq_len)
    held_out = held_out_windows(tokenizer, args.eval_len, args.eval_windows)
    stats, heal_cache, capture_s = timed_capture(model, data.capture, 4)
    fit_on = heal_windows(data.capture, hidden_size(model))  # the windows those states cover
    dense = perplexity(model, held_out, batch_size=4)

    rows = []
    for n in args.budgets:
        for method in METHODS:
            plan = select(method, stats.S, stats.D, n).pruned_layers
            with pruned_view(model, plan):
                unhealed = perplexity(model, held_out, batch_size=4)
            healed: dict[str, tuple[float, float]] = {}
            for mode in ("sequential", "dense"):
                healer = CachedHealer(model, heal_cache, mode=mode)  # type: ignore[arg-type]
                started = time.perf_counter()
                fits = healer.fits(plan)
                fit_s = time.perf_counter() - started
                with folded(model, fits), pruned_view(model, plan):
                    healed[mode] = (perplexity(model, held_out, batch_size=4), fit_s / capture_s)
            rows.append((n, method, plan, unhealed, healed))
            print(n, method, plan, f"{unhealed:.2f}", {k: f"{v[0]:.2f}" for k, v in healed.items()}, flush=True)

    cal_tokens = args.num_samples * args.seq_len
    section = [
        HEAL_HEADING,
        "",
        f"Demo model (SmolLM2-135M, 30 blocks), CPU float32, {args.num_samples} calibration windows of "
        f"{args.seq_len} tokens ({cal_tokens:,} tokens); held-out perplexity on {args.eval_windows} windows of "
        f"{args.eval_len} tokens of the built-in evaluation text (dense {dense:.2f}). The maps are fitted as a job "
        f"fits them (`lorp.scoring.CachedHealer`) on the first {fit_on.num_tokens:,} calibration tokens, from the "
        "states the capture kept; jobs use `dense` (docs/algorithm.md §8a). Fit time is relative to that capture "
        f"of the calibration windows in the same run ({capture_s:.1f} s). "
        "`python scripts/bench_heal.py --budgets 4 6 8` reproduces this table.",
        "",
        "| blocks | method | plan | unhealed | healed, sequential | healed, dense | "
        "healed / unhealed (seq.) | fit time, seq. / dense (x capture) |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for n, method, plan, unhealed, healed in rows:
        seq, one = healed["sequential"], healed["dense"]
        section.append(
            f"| {n} | {method} | {plan} | {unhealed:.2f} | {seq[0]:.2f} | {one[0]:.2f} | {seq[0] / unhealed:.2f} | "
            f"{seq[1]:.1f} / {one[1]:.1f} |"
        )
    print("\n".join(section))
    replace_section(args.out, HEAL_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
