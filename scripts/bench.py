"""Engine benchmark on the demo model (SmolLM2-135M, 30 blocks): prints tables and records them.

Measured side by side in one run, medians over interleaved repeats (shared machines are noisy):
1. capture throughput vs a plain forward through the blocks alone (target >= 0.97);
2. held-out perplexity of every method, auto included, at 2, 4, 6, 8 removed blocks (auto must be
   within 5% of the best other method); auto's plan is chosen as a job chooses it
   (``lorp.planner.choose_plan`` on the calibration's validation windows), unhealed like the others
   (``options.heal`` none: scripts/bench_plans.py measures healed plans);
3. pruned vs dense decode speed-up against the bound N/(N-n).

    python scripts/bench.py [--out docs/benchmarks.md] [--num-samples 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from benchdoc import other_sections, replace_section

from lorp import calibration as cal
from lorp.blocks import pruned_view
from lorp.evaluation import measure_speed, perplexity
from lorp.execution import Runner
from lorp.loading import load_model
from lorp.planner import choose_plan
from lorp.selection import candidate_plans
from lorp.similarity import capture_similarity
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec

METHODS = ("lorp", "shortgpt", "streamline", "angular", "reverse")
CAPTURE_HEADING = "## Capture throughput (medians of interleaved repeats)"
PERPLEXITY_HEADING = "## Held-out perplexity by method"  # the dense figure follows in the heading
SPEED_HEADING = "## Decode speed, pruned (auto's plan) vs dense"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU's kernels run on after the call returns
    return time.perf_counter() - start


def bench_capture(model, windows, batch_size: int, repeats: int) -> dict:
    tokens = int(windows.attention_mask.sum())

    runner = Runner(model)

    def plain() -> None:  # every block on every batch, nothing recorded (no final norm, no head)
        with torch.inference_mode():
            for batch in runner.batches(windows, batch_size):
                runner.run(batch)

    def capture() -> None:
        capture_similarity(model, windows, batch_size=batch_size)

    plain()  # warm-up
    capture()
    plain_t, capture_t = [], []
    for rep in range(repeats):
        # Alternate which runs first: on a shared machine, a fixed order biases the ratio.
        if rep % 2 == 0:
            plain_t.append(_timed(plain))
            capture_t.append(_timed(capture))
        else:
            capture_t.append(_timed(capture))
            plain_t.append(_timed(plain))
    p, c = statistics.median(plain_t), statistics.median(capture_t)
    return {"tokens": tokens, "plain_tok_s": tokens / p, "capture_tok_s": tokens / c, "ratio": p / c}


def _capture_section(cap: dict, args: argparse.Namespace, when: str) -> list[str]:
    return [
        CAPTURE_HEADING,
        "",
        f"{when}: {args.num_samples} x {args.seq_len} tokens, batch {args.batch_size}, {args.repeats} repeats, "
        "plain and capture runs alternating.",
        "",
        "| tokens | plain forward through the blocks, tok/s | capture (S and D), tok/s | ratio (target >= 0.97) |",
        "|---:|---:|---:|---:|",
        f"| {cap['tokens']} | {cap['plain_tok_s']:.0f} | {cap['capture_tok_s']:.0f} | {cap['ratio']:.3f} |",
        "",
    ]


def _replace_capture_section(out: Path, cap: dict, args: argparse.Namespace) -> int:
    when = f"Re-measured alone {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC (`python scripts/bench.py --capture-only`)"
    section = _capture_section(cap, args, when)
    print("\n".join(section))
    replace_section(out, CAPTURE_HEADING, section)
    return 0


Table = dict[str, dict[int, tuple[float, list[int]]]]


def _held_out_by_method(model, stats, data, eval_windows, budgets: list[int], args) -> tuple[Table, dict[int, str]]:
    """Held-out perplexity and plan of each method at each budget, and auto's pick (chosen as a job
    chooses, on the calibration's validation windows), every plan unhealed."""
    opts = SelectionOptions(heal="none")  # every row unhealed, auto's too
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    table: Table = {m: {} for m in (*METHODS, "auto")}
    auto_pick: dict[int, str] = {}
    for n in budgets:
        plans = candidate_plans(stats.S, stats.D, n, opts)
        for name in METHODS:
            if name in plans:
                with pruned_view(model, plans[name].pruned_layers):
                    ppl = perplexity(model, eval_windows, batch_size=args.batch_size)
                table[name][n] = (ppl, plans[name].pruned_layers)
        spec = PruneSpec(
            model=ModelSpec(id=args.model), target=TargetSpec(num_layers=n), calibration=calibration, options=opts
        )
        chosen = choose_plan(model, stats.S, stats.D, data, spec, stats.num_blocks).chosen
        with pruned_view(model, chosen.pruned_layers):
            table["auto"][n] = (perplexity(model, eval_windows, batch_size=args.batch_size), chosen.pruned_layers)
        auto_pick[n] = chosen.method
        print(f"n={n}: auto chose {chosen.method} {chosen.pruned_layers}", file=sys.stderr)
    return table, auto_pick


def _decode_speed(model, eval_windows, plans: list[list[int]], repeats: int) -> list[tuple[float, float]]:
    """(dense, pruned) median decode tokens/s for each plan, runs interleaved."""
    prompt = eval_windows.input_ids[:1, :128]
    rows = []
    for blocks in plans:
        dense_runs, pruned_runs = [], []
        for _ in range(repeats):
            dense_runs.append(measure_speed(model, prompt, new_tokens=32, repeats=1)["decode_tokens_per_s"])
            with pruned_view(model, blocks):
                pruned_runs.append(measure_speed(model, prompt, new_tokens=32, repeats=1)["decode_tokens_per_s"])
        rows.append((statistics.median(dense_runs), statistics.median(pruned_runs)))
    return rows


def _method_lines(table: Table, auto_pick: dict[int, str], budgets: list[int], dense_ppl: float) -> list[str]:
    lines = [
        f"{PERPLEXITY_HEADING} (dense: {dense_ppl:.2f})",
        "",
        "| method | " + " | ".join(f"n={n}" for n in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name in (*METHODS, "auto"):
        cells = []
        for n in budgets:
            if n in table[name]:
                ppl, blocks = table[name][n]
                cells.append(f"{ppl:.2f} {blocks}")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    verdicts = []
    for n in budgets:
        best_other = min(table[m][n][0] for m in METHODS if n in table[m])
        ratio = table["auto"][n][0] / best_other
        verdicts.append(
            f"| {n} | {auto_pick[n]} | {table['auto'][n][0]:.2f} | {best_other:.2f} | {ratio:.3f} | "
            f"{'yes' if ratio <= 1.05 else 'NO'} |"
        )
    return [
        *lines,
        "auto against the best other method on the held-out text (auto chooses on the calibration",
        "validation slice, never on this text):",
        "",
        "| n | auto chose | auto ppl | best other ppl | ratio | within 5% |",
        "|---:|---|---:|---:|---:|---|",
        *verdicts,
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--budgets", default="2,4,6,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--capture-only",
        action="store_true",
        help="measure only the capture throughput and replace that section of --out in place",
    )
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]

    t0 = time.perf_counter()
    loaded = load_model(args.model, device="auto")
    model, tok = loaded.model, loaded.tokenizer
    data = cal.build_calibration(
        tok, cal.load_texts(cal.parse_source("builtin")), num_samples=args.num_samples, seq_len=args.seq_len
    )
    eval_windows = cal.evaluation_windows(
        tok,
        cal.load_texts(cal.parse_source("builtin"), role="evaluation"),
        seq_len=args.seq_len,
        max_windows=args.eval_windows,
    )
    print(
        f"loaded {args.model} on {loaded.device} ({loaded.dtype}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    cap = bench_capture(model, data.capture, args.batch_size, args.repeats)
    if args.capture_only:
        return _replace_capture_section(Path(args.out), cap, args)
    stats = capture_similarity(model, data.capture, batch_size=args.batch_size)
    n_blocks = stats.num_blocks
    dense_ppl = perplexity(model, eval_windows, batch_size=args.batch_size)
    table, auto_pick = _held_out_by_method(model, stats, data, eval_windows, budgets, args)
    speed_rows = _decode_speed(model, eval_windows, [table["auto"][n][1] for n in budgets], args.repeats)

    lines = [
        "# Benchmarks",
        "",
        f"Recorded {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `make bench` "
        f"(`python scripts/bench.py --num-samples {args.num_samples} --seq-len {args.seq_len} "
        f"--batch-size {args.batch_size} --eval-windows {args.eval_windows} --repeats {args.repeats}`).",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, device {loaded.device}, dtype "
        f"{str(loaded.dtype).removeprefix('torch.')}, torch {torch.__version__}. Model: {args.model} "
        f"({n_blocks} blocks). Calibration: built-in corpus, {args.num_samples} x {args.seq_len} tokens, seed 0. "
        f"Held-out: built-in evaluation split, {eval_windows.input_ids.shape[0]} x {args.seq_len} tokens.",
        "",
        *_capture_section(cap, args, "measured in this run"),
        *_method_lines(table, auto_pick, budgets, dense_ppl),
        f"{SPEED_HEADING}, batch 1, 128-token prompt, 32 new tokens",
        "",
        "| n | dense tok/s | pruned tok/s | speed-up | bound N/(N-n) |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {n} | {d:.1f} | {p:.1f} | {p / d:.3f} | {n_blocks / (n_blocks - n):.3f} |"
            for n, (d, p) in zip(budgets, speed_rows, strict=True)
        ],
        "",
    ]
    print("\n".join(lines))
    if args.out:
        # Every other section (other scripts', and hand-written notes) is kept as it is.
        kept = other_sections(Path(args.out), (CAPTURE_HEADING, PERPLEXITY_HEADING, SPEED_HEADING))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join([*lines, *kept]).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
