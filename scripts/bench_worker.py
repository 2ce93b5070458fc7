"""Worker benchmark: how long a job takes in a freshly forked Celery pool child.

The worker runs each job in a new child forked from its main process (one task per child). What the
main process imported before forking, the child has for free; what it did not, every job imports
again. This compares two parents side by side, interleaved over rounds:

- ``engine``: the parent imports torch and the engine modules only;
- ``warm``:   the parent also runs ``worker.warmup.warm_imports`` (what ``lorp worker`` does).

Each parent forks children one after another; each child runs the cheapest real job (a 2-block tiny
Llama, 2 windows of 16 tokens, the ``reverse`` plan, no evaluation) through ``run_prune`` and reports
its wall time. Medians over all children of each kind; the table goes into docs/benchmarks.md.

    python scripts/bench_worker.py [--rounds 3 --children 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import WORKER_HEADING as HEADING
from benchdoc import replace_section

ROOT = Path(__file__).resolve().parents[1]


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


def parent(kind: str, model: Path, children: int, work: Path) -> dict:
    """Import like a worker's main process, then fork ``children`` jobs one after another."""
    started = time.perf_counter()
    import lorp.pipeline

    if kind == "warm":
        from worker.warmup import warm_imports

        warm_imports()
    preload_s = time.perf_counter() - started
    spec = _spec(model)
    times: list[float] = []
    for index in range(children):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the pool child: one job, then exit
            os.close(read_end)
            t = time.perf_counter()
            lorp.pipeline.run_prune(spec, work / f"{kind}-{os.getppid()}-{index}")  # type: ignore[arg-type]
            os.write(write_end, f"{time.perf_counter() - t}".encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            value = pipe.read()
        os.waitpid(pid, 0)
        times.append(float(value))
    return {"kind": kind, "preload_s": preload_s, "job_s": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--children", type=int, default=2)
    parser.add_argument("--parent", choices=("engine", "warm"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parent:
        result = parent(args.parent, Path(args.model), args.children, Path(args.work))
        print(json.dumps(result))
        return 0

    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(tempfile.mkdtemp(prefix="lorp-bench-worker-"))
    try:
        model = _tiny_model(work)
        results: dict[str, list[dict]] = {"engine": [], "warm": []}
        for round_ in range(args.rounds):
            order = ("engine", "warm") if round_ % 2 == 0 else ("warm", "engine")
            for kind in order:
                proc = subprocess.run(
                    [sys.executable, __file__, "--parent", kind, "--model", str(model), "--work", str(work),
                     "--children", str(args.children)],
                    check=True, capture_output=True, text=True, cwd=ROOT,
                )  # fmt: skip
                results[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"round {round_ + 1} {kind}: {results[kind][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(kind: str, key: str) -> float:
        values = [v for r in results[kind] for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        return statistics.median(values)

    engine_job, warm_job = med("engine", "job_s"), med("warm", "job_s")
    section = [
        HEADING,
        "",
        f"Recorded {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `python scripts/bench_worker.py` on "
        f"{platform.machine()}, {os.cpu_count()} CPU cores: {args.rounds} rounds of both parents, interleaved, "
        f"{args.children} children each; medians. The job is the cheapest real one (2-block tiny Llama, "
        "2 x 16 tokens, `reverse`, no evaluation), so the job time is mostly what the child imports.",
        "",
        "| parent imports before forking | parent start, s | job in the child, s |",
        "|---|---:|---:|",
        f"| torch + engine modules | {med('engine', 'preload_s'):.2f} | {engine_job:.2f} |",
        f"| + `warm_imports()` (what `lorp worker` does) | {med('warm', 'preload_s'):.2f} | {warm_job:.2f} |",
        "",
        f"A job in a warm child takes {warm_job / engine_job:.2f} of the time ({engine_job / warm_job:.1f}x faster); "
        "the worker pays the difference once, at start.",
        "",
    ]
    print("\n".join(section))
    replace_section(ROOT / args.out, HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
