"""Worker benchmark: what each way of starting a job's process costs, measured side by side.

The worker runs each job in a new pool process (one task per child). Three ways to start one:

- ``fork``: forked from the worker's main process, warmed beforehand (``worker.warmup``). The
  cheapest, and the way that hung: the main process runs threads, and a fork copies whatever lock
  another thread held at that instant (1,000 jobs through ``lorp serve`` hung after ~116).
- ``spawn``: a fresh interpreter per job (Celery's ``worker_pool_start_method = "spawn"``). Safe, but
  every job imports torch, transformers and the engine again.
- ``forkserver``: forked by a single-threaded fork server that imported and warmed the engine once
  (``worker.forkserver``, what the worker does now). Safe, and warm.

Each way starts the cheapest real job (a 2-block tiny Llama, 2 windows of 16 tokens, the ``reverse``
plan, no evaluation) through billiard's process contexts, as the pool does, one after another, in
rounds that interleave the three; a job's time runs from asking for its process to that process's
exit. Medians; the table goes into docs/benchmarks.md.

    python scripts/bench_worker.py [--rounds 5 --children 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import WORKER_HEADING as HEADING
from benchdoc import replace_section

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fork", "spawn", "forkserver")


def _tiny_model(root: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorp.loading import load_model

    tokenizer = load_model("demo").tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    path = root / "tiny"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _spec(model: Path) -> object:
    from lorp.spec import PruneSpec

    return PruneSpec.model_validate(
        {
            "model": {"id": str(model)},
            "method": "reverse",
            "target": {"num_layers": 1},
            "calibration": {"dataset": "builtin", "num_samples": 2, "seq_len": 16, "batch_size": 2},
            "options": {"protected_layers": []},
            "evaluation": {"perplexity": False, "speed": False, "max_windows": 1},
        }
    )


def _run(method: str, spec: object, work: Path, children: int, round_: int) -> list[float]:
    """Start ``children`` job processes one after another the ``method`` way; each one's seconds."""
    import billiard

    import lorp.pipeline

    context = billiard.get_context(method)
    times = []
    for index in range(children):
        started = time.perf_counter()
        process = context.Process(
            target=lorp.pipeline.run_prune, args=(spec, work / f"{method}-{round_}-{index}"), daemon=False
        )
        process.start()
        process.join()
        times.append(time.perf_counter() - started)
        if process.exitcode != 0:
            raise RuntimeError(f"a {method} job exited with {process.exitcode}")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--children", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    import billiard

    from worker.pool import FORKSERVER_PRELOAD
    from worker.warmup import warm_imports

    work = Path(tempfile.mkdtemp(prefix="lorp-bench-worker-"))
    try:
        model = _tiny_model(work)
        spec = _spec(model)
        warm_imports()  # what a forking worker's main process did before its first fork
        server = billiard.get_context("forkserver")
        server.set_forkserver_preload(FORKSERVER_PRELOAD)
        started = time.perf_counter()
        # The fork server's start and warm-up, paid once per worker (the first child waits for it).
        _run("forkserver", spec, work, 1, -1)
        server_first_s = time.perf_counter() - started
        results: dict[str, list[float]] = {m: [] for m in METHODS}
        for round_ in range(args.rounds):
            order = METHODS if round_ % 2 == 0 else tuple(reversed(METHODS))
            for method in order:
                results[method] += _run(method, spec, work, args.children, round_)
                print(f"round {round_ + 1} {method}: {[round(t, 2) for t in results[method][-args.children:]]}",
                      file=sys.stderr)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {m: statistics.median(results[m]) for m in METHODS}
    server = med["forkserver"] / med["fork"]
    rows = {
        "fork": "forked from the warm main process (before: hangs when another thread holds a lock)",
        "spawn": "a fresh interpreter per job",
        "forkserver": "forked by the warm, single-threaded fork server (now)",
    }
    section = [
        HEADING,
        "",
        f"Recorded {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python scripts/bench_worker.py` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores: {args.rounds} rounds, the three ways interleaved, "
        f"{args.children} jobs each per round; medians. The job is the cheapest real one (2-block tiny Llama, "
        "2 x 16 tokens, `reverse`, no evaluation), so its time is mostly what its process has to import.",
        "",
        "| how the job's process starts | job, s | vs fork |",
        "|---|---:|---:|",
        *(f"| `{m}`: {rows[m]} | {med[m]:.2f} | {med[m] / med['fork']:.2f} |" for m in METHODS),
        "",
        f"Paid once per worker: starting and warming the fork server, with its first job, {server_first_s:.1f} s. "
        f"A job then costs {server:.2f}x what it does forked from a warm main process"
        f"{' (the same, within this machine' + chr(39) + 's noise)' if 0.8 <= server <= 1.25 else ''}, where a "
        f"fresh interpreter costs {med['spawn'] / med['fork']:.1f}x; and no pool process is ever forked by a "
        "process that runs threads. The fork server is what the worker uses.",
        "",
    ]
    print("\n".join(section))
    replace_section(ROOT / args.out, HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
