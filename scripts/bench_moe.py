"""Healing a mixture of experts on real weights: the demo model, and a Mixtral made from it.

The Mixtral has the demo model's (SmolLM2-135M) attention, norms and embeddings, and in every block
four experts, each a copy of that block's MLP, under a random top-2 router
(``tests/engine/archs.upcycled_mixtral``). Its routing weights sum to one, so it computes what the
demo model computes, through experts: a heal map fitted on its routed sum and folded into every
expert must cut and heal it as the demo model is cut and healed. For each model and budget: the
capture (timed), ShortGPT's plan from that model's own S and D, held-out perplexity unhealed and
healed (maps fitted as a job fits them, on the capture's kept states) and the healed span's fit
residual. Writes its section of docs/benchmarks.md.

    python scripts/bench_moe.py [--budgets 4 8] [--num-samples 32] [--eval-windows 16] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from benchdemo import capture_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import MOE_HEADING, replace_section  # noqa: E402

from lorp.blocks import pruned_view  # noqa: E402
from lorp.evaluation import perplexity  # noqa: E402
from lorp.execution import folded  # noqa: E402
from lorp.scoring import CachedHealer  # noqa: E402
from lorp.selection import select  # noqa: E402
from tests.engine.archs import upcycled_mixtral  # noqa: E402


def measure(model, data, held_out, budgets: list[int]) -> dict:
    """One model's capture time, dense perplexity, and per budget ShortGPT's plan unhealed and healed."""
    stats, heal_cache, capture_s = timed_capture(model, data.capture, 4)
    rows = {}
    for n in budgets:
        plan = select("shortgpt", stats.S, stats.D, n).pruned_layers
        with pruned_view(model, plan):
            unhealed = perplexity(model, held_out, batch_size=4)
        fits = CachedHealer(model, heal_cache, mode="dense").fits(plan)
        with folded(model, fits), pruned_view(model, plan):
            healed = perplexity(model, held_out, batch_size=4)
        residual = max(fit.span.residual_after for fit in fits) if fits else 0.0
        rows[n] = (plan, unhealed, healed, residual)
        print(type(model).__name__, n, plan, f"{unhealed:.3f} -> {healed:.3f}", flush=True)
    return {"capture_s": capture_s, "dense": perplexity(model, held_out, batch_size=4), "rows": rows}


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
    dense_model, tokenizer = loaded.model, loaded.tokenizer
    data = capture_calibration(tokenizer, args.num_samples, args.seq_len)
    held_out = held_out_windows(tokenizer, args.eval_len, args.eval_windows)
    results = {"demo (Llama)": measure(dense_model, data, held_out, args.budgets)}
    results["Mixtral made from it"] = measure(upcycled_mixtral(dense_model), data, held_out, args.budgets)

    base = results["demo (Llama)"]
    section = [
        MOE_HEADING,
        "",
        f"CPU float32, {args.num_samples} calibration windows of {args.seq_len} tokens; held-out perplexity on "
        f"{args.eval_windows} windows of {args.eval_len} tokens of the built-in evaluation text. The Mixtral has "
        "the demo model's attention, norms and embeddings and, in each of its 30 blocks, four experts that are "
        "copies of the block's MLP under a random top-2 router: it computes what the demo model computes, through "
        "experts, so a heal map fitted on its routed sum and folded into every expert must give the demo model's "
        "figures. ShortGPT's plan from each model's own capture; maps fitted as a job fits them (dense mode, "
        "on the capture's kept states). `python scripts/bench_moe.py` reproduces this table.",
        "",
        "| model | capture (x the demo's) | dense | blocks | plan | unhealed | healed | fit residual |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, result in results.items():
        for n, (plan, unhealed, healed, residual) in result["rows"].items():
            section.append(
                f"| {name} | {result['capture_s'] / base['capture_s']:.2f} | {result['dense']:.3f} | {n} | {plan} | "
                f"{unhealed:.3f} | {healed:.3f} | {residual:.4f} |"
            )
    print("\n".join(section))
    replace_section(args.out, MOE_HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
