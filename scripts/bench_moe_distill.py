"""Distilling a mixture of experts on real weights: the demo model, and a Mixtral made from it.

The Mixtral is ``scripts/bench_moe.py``'s: the demo model's (SmolLM2-135M) attention, norms and embeddings
and, in each block, four experts that are copies of the block's MLP under a random top-2 router. It
computes what the demo model computes and is cut and healed as the demo model is. Distillation is where
the two part: the demo model's adapters sit on its attention and MLP projections, and the Mixtral's on
its attention and its experts (``lorp.adapters``, each expert its own update), or, as distillation
trained a mixture of experts before its experts got adapters, on its attention alone.

At each budget, ShortGPT's plan from each model's own capture, healed with maps fitted as a job fits them,
then distilled as a job distils it (``lorp.distill``: the dense model's final states on the training and
validation windows, the adapters trained on the training windows, each cut's anchor first, the
validation guard). On the held-out windows of the built-in evaluation text: perplexity, mean KL(dense ||
pruned) and top-1 agreement, healed and distilled; the distillation's time (teacher's pass included)
relative to that model's capture. Writes its section of docs/benchmarks.md.

    python scripts/bench_moe_distill.py [--budgets 8] [--steps 100] [--learning-rates 5e-3] [--only demo|mixtral]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from bench_distill import Measure, distilled_copy  # noqa: E402
from benchdemo import demo_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import MOE_DISTILL_HEADING, replace_section, section_lines  # noqa: E402

import lorp.distill  # noqa: E402
from lorp.distill import (  # noqa: E402
    LEARNING_RATE,
    dense_finals,
    training_autocast,
    windows_to_read,
)
from lorp.options import DEFAULT_HEAL_STEPS  # noqa: E402
from lorp.scoring import CachedHealer  # noqa: E402
from lorp.selection import select  # noqa: E402
from lorp.spec import CalibrationSpec  # noqa: E402
from tests.engine.archs import upcycled_mixtral  # noqa: E402

BATCH = 4


@contextmanager
def experts_frozen() -> Iterator[None]:
    """Adapters on the linear layers alone: how distillation trained a mixture of experts before."""
    rule = lorp.distill.trains_experts
    lorp.distill.trains_experts = lambda model, block, anchors: False
    try:
        yield
    finally:
        lorp.distill.trains_experts = rule


def cell(figures: dict) -> str:
    return f"{figures['ppl']:.2f} / {figures['kl_mean']:.3f} / {figures['top1_agreement']:.3f}"


def runs(model, name: str, data, measure, budgets, steps: int, rates: list[float], variants) -> list[dict]:
    """Per budget, the model's plan healed, then distilled once per (variant, learning rate)."""
    stats, heal_cache, capture_s = timed_capture(model, data.capture, BATCH)
    healer = CachedHealer(model, heal_cache, mode="dense")
    autocast = training_autocast(model)
    validation = dense_finals(model, data.validation, BATCH, None)
    rows = []
    for n in budgets:
        plan = sorted(select("shortgpt", stats.S, stats.D, n).pruned_layers)
        fits = healer.fits(plan)
        healed = measure.held_out(model, plan, fits)
        for variant, frozen in variants:
            for rate in rates:
                with experts_frozen() if frozen else nullcontext():
                    pruned, summary, seconds = distilled_copy(
                        model, fits, plan, data, validation, steps=steps, learning_rate=rate, batch_size=BATCH,
                        autocast=autocast,
                    )  # fmt: skip
                row = {
                    "model": name, "adapters": variant, "blocks": n, "plan": plan, "rate": rate, "healed": healed,
                    "distilled": measure.held_out(pruned), "shipped": summary.shipped,
                    "cost": seconds / capture_s, "capture_s": capture_s,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name} / {variant} / {n} / lr {rate:g}: healed {cell(healed)} -> {cell(row['distilled'])} "
                    f"({summary.shipped}; validation KL {summary.linear_kl:.4f} -> {summary.distilled_kl:.4f}), "
                    f"{seconds:.0f} s = {row['cost']:.1f} captures",
                    flush=True,
                )
                del pruned
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=DEFAULT_HEAL_STEPS)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[LEARNING_RATE])
    parser.add_argument("--num-samples", type=int, default=CalibrationSpec().num_samples)  # a job's default
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument(
        "--only", choices=["demo", "mixtral"], default=None, help="one model's rows (the other's kept as recorded)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)

    loaded = demo_model()
    dense, tokenizer = loaded.model, loaded.tokenizer
    autocast = training_autocast(dense)
    precision = "float32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast"
    spec = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len)
    data = demo_calibration(tokenizer, spec, num_training=windows_to_read(args.steps, BATCH))
    held_out = held_out_windows(tokenizer, args.eval_len, args.eval_windows)
    rows: list[dict] = []
    if args.only != "mixtral":
        measure = Measure(dense, tokenizer, held_out, BATCH, 0)
        rows += runs(dense, "demo (Llama)", data, measure, args.budgets, args.steps, args.learning_rates,
                     [("attention and MLP", False)])  # fmt: skip
    if args.only != "demo":
        moe = upcycled_mixtral(dense)
        del dense, loaded
        measure = Measure(moe, tokenizer, held_out, BATCH, 0)
        variants = [("attention and experts", False), ("attention only (before)", True)]
        rows += runs(moe, "Mixtral made from it", data, measure, args.budgets, args.steps, args.learning_rates,
                     variants)  # fmt: skip

    section = [
        MOE_DISTILL_HEADING,
        "",
        f"`python scripts/bench_moe_distill.py --budgets {' '.join(map(str, args.budgets))} --steps {args.steps} "
        f"--learning-rates {' '.join(f'{r:g}' for r in args.learning_rates)}"
        f"{' --only ' + args.only if args.only else ''}` (CPU float32; the training passes in "
        f"{precision}). Calibration {args.num_samples} x {args.seq_len} built-in tokens (distillation trains on "
        f"{data.training_windows.num_windows} windows of the same text, as a job draws them; "
        f"{data.validation.num_windows} validation windows decide what ships); held-out: {args.eval_windows} x "
        f"{args.eval_len} tokens of the built-in evaluation text. The Mixtral is scripts/bench_moe.py's; `--only demo` "
        "or `--only mixtral` runs one model's rows again and keeps the other's as recorded. Each cell: "
        "held-out perplexity / mean KL (nats) / top-1 agreement against the model's own dense figures (the same "
        "for both models). Cost: the distillation, teacher's pass included, relative to that model's capture.",
        "",
        "| model | adapters on | blocks | plan | steps | learning rate | healed (linear) | distilled (shipped) "
        "| cost |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    ran = {row["model"] for row in rows}
    lines = [  # --only: the other model's rows as an earlier run recorded them
        line
        for line in section_lines(args.out, MOE_DISTILL_HEADING)
        if line.startswith("| ") and not line.startswith("| model ") and line.split(" | ")[0][2:] not in ran
    ]
    lines += [
        f"| {row['model']} | {row['adapters']} | {row['blocks']} | {row['plan']} | {args.steps} | {row['rate']:g} | "
        f"{cell(row['healed'])} | {cell(row['distilled'])} ({row['shipped']}) | {row['cost']:.1f} |"
        for row in rows
    ]
    section += sorted(lines, key=lambda line: not line.startswith("| demo"))  # the demo model's first
    print("\n".join(section))
    replace_section(args.out, MOE_DISTILL_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
