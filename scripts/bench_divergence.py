"""How close each training-free plan stays to the dense model, by divergence, beside what a distilling job ships.

Perplexity says how well a pruned model predicts text; the KL from the dense model's next-token
distributions says how much of the dense model it still is. At each budget, on the same held-out windows
of the built-in evaluation text: every one-pass method's plan removed as it is and with the linear heal
(``lorp.heal``: fitted, no training), ``auto`` and ``search`` chosen as a job chooses them with the linear
heal (``search`` at ``--search-budgets``), once ranking plans by validation perplexity (the default) and
once by validation KL (``options.selection_metric: kl``), and, at ``--distill-budgets``, auto's healed
plan distilled as a job distils it (``options.heal: distill``, the defaults; the one model here that is
trained). Each cell:
held-out mean KL(dense || pruned) in nats / its 99th percentile / top-1 agreement / perplexity.
Writes its section of docs/benchmarks.md.

    python scripts/bench_divergence.py [--budgets 4 6 8 10] [--search-budgets 8 10] [--distill-budgets 8]
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

from bench_distill import Measure, copy_settings, distilled_copy  # noqa: E402
from benchdemo import demo_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import DIVERGENCE_HEADING, replace_section  # noqa: E402

from lorp.blocks import decoder_blocks  # noqa: E402
from lorp.distill import CE_WEIGHT, LEARNING_RATE, WARM_STEPS, dense_finals, windows_to_read  # noqa: E402
from lorp.options import DEFAULT_HEAL_STEPS  # noqa: E402
from lorp.planner import choose_plan  # noqa: E402
from lorp.scoring import CachedHealer  # noqa: E402
from lorp.selection import candidate_plans  # noqa: E402
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec  # noqa: E402

ONE_PASS = ("lorp", "shortgpt", "streamline", "angular", "reverse")
METRICS = ("perplexity", "kl")


def cell(got: dict[str, float]) -> str:
    return f"{got['kl_mean']:.3f} / {got['kl_p99']:.2f} / {got['top1_agreement']:.3f} / {got['ppl']:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument(
        "--distill-budgets", type=int, nargs="*", default=[],
        help="also distil auto's plan at these budgets (each about 20 captures' time on this machine)",
    )  # fmt: skip
    parser.add_argument(
        "--search-budgets", type=int, nargs="*", default=[8, 10],
        help="also choose with search at these budgets (each several captures' time, twice)",
    )  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=CalibrationSpec().num_samples)  # a job's default
    parser.add_argument("--seq-len", type=int, default=CalibrationSpec().seq_len)
    parser.add_argument("--batch-size", type=int, default=CalibrationSpec().batch_size)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.perf_counter()

    loaded = demo_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    n_blocks = len(decoder_blocks(model))
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    training = windows_to_read(DEFAULT_HEAL_STEPS, args.batch_size) if args.distill_budgets else 0
    data = demo_calibration(tokenizer, calibration, num_training=training)
    measure = Measure(
        model, tokenizer, held_out_windows(tokenizer, args.eval_len, args.eval_windows), args.batch_size, 0
    )
    teacher = dense_finals(model, data.validation, args.batch_size, None) if args.distill_budgets else None
    # bench_distill's arguments for a job's distillation, as its defaults have them
    job_distillation = argparse.Namespace(
        batch_size=args.batch_size, ce_weight=CE_WEIGHT, seed=0, warm_steps=WARM_STEPS, precision="auto"
    )
    settings = copy_settings(job_distillation, model)

    rows: list[tuple[int, dict[str, dict[str, float]], dict[str, list[int]]]] = []
    for n in args.budgets:
        stats, heal_cache, _ = timed_capture(model, data.capture, args.batch_size)
        got: dict[str, dict[str, float]] = {}
        plans: dict[str, list[int]] = {}
        candidates = candidate_plans(stats.S, stats.D, n, SelectionOptions())
        healer = CachedHealer(model, heal_cache, mode="dense")
        for method in ONE_PASS:
            plan = candidates[method].pruned_layers
            plans[method] = list(plan)
            got[f"{method} none"] = measure.held_out(model, plan)
            got[f"{method} linear"] = measure.held_out(model, plan, healer.fits(plan))
        chosen = {}
        for method in ("auto", "search") if n in args.search_budgets else ("auto",):
            for metric in METRICS:
                spec = PruneSpec(
                    model=ModelSpec(id="demo"),
                    method=method,  # type: ignore[arg-type]
                    target=TargetSpec(num_layers=n),
                    calibration=calibration,
                    options=SelectionOptions(heal="linear", selection_metric=metric),  # type: ignore[arg-type]
                )
                choice = choose_plan(model, stats.S, stats.D, data, spec, n_blocks, heal_cache=heal_cache)
                chosen[(method, metric)] = choice
                plans[f"{method} {metric}"] = list(choice.chosen.pruned_layers)
                got[f"{method} {metric}"] = measure.held_out(model, choice.chosen.pruned_layers, choice.fits)
        if n in args.distill_budgets and ("auto", "perplexity") in chosen:
            choice = chosen[("auto", "perplexity")]
            pruned, summary, seconds = distilled_copy(
                model, choice.fits, choice.chosen.pruned_layers, data, teacher, steps=DEFAULT_HEAL_STEPS,
                learning_rate=LEARNING_RATE, **settings,
            )  # fmt: skip
            got["distill"] = measure.held_out(pruned) if summary.shipped == "distill" else got["auto perplexity"]
            plans["distill"] = list(choice.chosen.pruned_layers)
            print(f"n={n} distilled ({summary.shipped}) in {seconds:.0f} s", flush=True)
            del pruned
        rows.append((n, got, plans))
        print(n, {k: cell(v) for k, v in got.items()}, flush=True)

    columns = [f"{m} none" for m in ONE_PASS] + [f"{m} linear" for m in ONE_PASS]
    chosen_columns = [f"{m} {metric}" for m in ("auto", "search") for metric in METRICS]
    distilled = f" --distill-budgets {' '.join(map(str, args.distill_budgets))}" if args.distill_budgets else ""
    default = ", a job's default" if (args.num_samples, args.seq_len) == (64, 256) else ""
    section = [
        DIVERGENCE_HEADING,
        "",
        f"Recorded {started_at} by `python scripts/bench_divergence.py --budgets {' '.join(map(str, args.budgets))} "
        f"--search-budgets {' '.join(map(str, args.search_budgets))}{distilled}` "
        f"({platform.machine()}, CPU float32, torch {torch.__version__}; {time.perf_counter() - began:.0f} s in all). "
        f"Demo model ({n_blocks} blocks); calibration {args.num_samples} x {args.seq_len} built-in tokens{default} "
        f"(plans validated on {data.validation.num_windows} held-out calibration windows); held-out: "
        f"{args.eval_windows} x {args.eval_len} tokens of the built-in evaluation text (dense perplexity "
        f"{measure.dense_ppl:.2f}). Each cell: held-out mean KL(dense || pruned), nats / its 99th percentile / "
        "top-1 agreement / perplexity. `none`: the plan's blocks removed as they are; `linear`: with the linear "
        "heal (fitted from the capture, no training); `auto` / `search` `perplexity` / `kl`: chosen as a job chooses "
        "with the linear heal, plans ranked by validation perplexity (the default) or by validation KL "
        "(`options.selection_metric: kl`); `distill`: auto's plan (by perplexity) distilled as a job distils it "
        f"(`options.heal: distill`, {DEFAULT_HEAL_STEPS} steps; trained, so not training-free).",
        "",
        "| blocks | " + " | ".join(columns) + " |",
        "|---:|" + "---|" * len(columns),
    ]
    for n, got, _ in rows:
        section.append(f"| {n} | " + " | ".join(cell(got[c]) for c in columns) + " |")
    section += [
        "",
        "| blocks | " + " | ".join(chosen_columns) + " | distill |",
        "|---:|" + "---|" * (len(chosen_columns) + 1),
    ]
    for n, got, plans in rows:
        cells = [f"{cell(got[c])} {plans[c]}" if c in got else "-" for c in chosen_columns]
        cells.append(cell(got["distill"]) if "distill" in got else "-")
        section.append(f"| {n} | " + " | ".join(cells) + " |")
    section += [
        "",
        "The closest training-free model at each budget by held-out mean KL, against the best one-pass plan "
        "removed as it is, and what distillation ships:",
        "",
        "| blocks | best one-pass unhealed (KL) | closest training-free | its KL | ratio | distill KL | "
        "distill / closest training-free |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for n, got, _ in rows:
        unhealed = min((f"{m} none" for m in ONE_PASS), key=lambda c: got[c]["kl_mean"])
        free = [c for c in got if c != "distill"]
        closest = min(free, key=lambda c: got[c]["kl_mean"])
        kl = got[closest]["kl_mean"]
        distill = got.get("distill")
        shipped = f"{distill['kl_mean']:.3f} | {distill['kl_mean'] / kl:.2f}" if distill else "- | -"
        section.append(
            f"| {n} | {unhealed} ({got[unhealed]['kl_mean']:.3f}) | {closest} | {kl:.3f} | "
            f"{kl / got[unhealed]['kl_mean']:.2f} | {shipped} |"
        )
    print("\n".join(section))
    replace_section(args.out, DIVERGENCE_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
