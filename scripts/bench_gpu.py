"""The engine on a GPU in bfloat16: a whole `lorp prune` job on a model of Llama-3.1-8B's shape,
sequential and resident, and the capture's throughput against a plain forward pass.

The model is generated on the GPU (random bfloat16 weights, 32 blocks of hidden 4096 and MLP 14336,
8 key-value heads, untied head, vocabulary 128,256: 8.0 B parameters, 16 GB in 2 GB shards) with the
demo model's tokenizer, so the figures are memory and time, not quality. Each job runs in its own
process, which reports its peak device memory (``torch.cuda.max_memory_allocated``) and its peak
resident host memory. The GPU is named in the recorded section.

Offline (a GPU machine with no hub and no ``gensim``), pass the tokenizer and the text:

    python scripts/bench_gpu.py --export-offline DIR      # here, with the hub's or the packages' files
    python scripts/bench_gpu.py --tokenizer DIR/tokenizer --calibration DIR/calibration.jsonl \
        --eval DIR/evaluation.jsonl [--out FILE]          # there

``--tokenizer`` defaults to the demo model's and the text to the built-in corpus. ``--profile
FILE`` writes each job's profile beside FILE (where a sequential job's time goes: its block loads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_checkpoint import generate
from bench_execution import copy_tokenizer, job_summary
from benchdoc import GPU_HEADING as HEADING
from benchdoc import replace_section

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}
BUDGET = 8
# Runs the CLI in this process, then reports what the process peaked at on the device and the host.
_JOB = """
import cProfile, io, json, os, pstats, resource, sys, torch
from lorp.cli import main
profile = os.environ.get("BENCH_PROFILE")
profiler = cProfile.Profile() if profile else None
if profiler:
    profiler.enable()
rc = main(sys.argv[1:])
if profiler:
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(80)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    pstats.Stats(profiler, stream=text).print_callers("_register_to_dispatcher|shards.py.*read|Stager.load")
    open(profile, "w").write(text.getvalue())
print("PEAKS " + json.dumps({
    "device": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
    "host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}), file=sys.stderr)
sys.exit(rc)
"""
_CAPTURE = """
import json, sys
sys.path.insert(0, "scripts")
from bench import bench_capture
from lorp import calibration as cal
from lorp.loading import load_model
model, text, batch, repeats, device, samples, seq_len, profile = sys.argv[1:]
loaded = load_model(model, device=device, dtype="bfloat16")
texts = cal.load_texts(cal.parse_source(text))
data = cal.build_calibration(loaded.tokenizer, texts, num_samples=int(samples), seq_len=int(seq_len))
print("CAPTURE " + json.dumps(bench_capture(loaded.model, data.capture, int(batch), int(repeats))))
if profile:  # where the capture's time goes beyond the plain pass: the device's kernels and the host's waits
    import torch
    from torch.profiler import ProfilerActivity, profile as profiled
    from lorp.similarity import capture_similarity
    from lorp.execution import Runner
    runner = Runner(loaded.model)
    def plain():
        with torch.inference_mode():
            for b in runner.batches(data.capture, int(batch)):
                runner.run(b)
    def capture():
        capture_similarity(loaded.model, data.capture, batch_size=int(batch))
    tables = []
    for name, fn in (("plain", plain), ("capture", capture)):
        cuda = torch.cuda.is_available()
        with profiled(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        averages = prof.key_averages()
        device_time = "cuda_time_total" if cuda else "self_cpu_time_total"
        tables += [f"== {name}: by device time", averages.table(sort_by=device_time, row_limit=25),
                   f"== {name}: by host time", averages.table(sort_by="cpu_time_total", row_limit=25)]
    open(profile, "w").write(chr(10).join(tables))
"""


def export_offline(folder: Path) -> None:
    """What a GPU machine without the hub or ``gensim`` needs: the demo model's tokenizer
    (``tokenizer/``) and the built-in corpus's two splits as JSONL (``calibration.jsonl``,
    ``evaluation.jsonl``), for ``--tokenizer --calibration --eval``."""
    from lorp.assets import builtin_corpus, demo_model_dir

    corpus = builtin_corpus()
    folder.mkdir(parents=True, exist_ok=True)
    for role in ("calibration", "evaluation"):
        lines = (json.dumps({"text": text}) + "\n" for text in getattr(corpus, role))
        (folder / f"{role}.jsonl").write_text("".join(lines), encoding="utf-8")
    copy_tokenizer(demo_model_dir(), folder / "tokenizer")


def prepare(path: Path, tokenizer: Path | None, shape: dict, device: str) -> None:
    if (path / "config.json").is_file():
        return
    if tokenizer is None:
        from lorp.assets import demo_model_dir

        tokenizer = demo_model_dir()
    print(f"generating {path} ...", flush=True)
    generate(path, shape, device=device)
    copy_tokenizer(tokenizer, path)


def warm_caches(model: Path) -> None:
    """What a worker that has run a job before has, so that neither job pays it and the first one
    does not pay it alone: the weights' hashes remembered (``lorp.assets.remembered_sha256``, 16 s for
    these 16 GB when cold) and matplotlib's font list built (14 s on a fresh machine)."""
    from matplotlib import font_manager

    from lorp.assets import remembered_sha256
    from lorp.shards import weight_files

    font_manager.findfont("DejaVu Sans")
    for path in weight_files(model):
        remembered_sha256(path)


def _tagged(stderr: str, tag: str) -> dict:
    line = next(line for line in reversed(stderr.splitlines()) if line.startswith(tag + " "))
    return json.loads(line.removeprefix(tag + " "))


def run_job(model: Path, mode: str, out: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-c", _JOB, "prune", "--model", str(model), "--device", args.device, "--dtype", "bfloat16",
        "--num-layers", str(BUDGET), "--method", "auto", "--execution", mode,
        "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--calibration", args.calibration, "--eval-windows", str(args.eval_windows),
        "--prompt", "The capital of France is", "--curve-budgets", "--out", str(out),
    ]  # fmt: skip
    if args.eval:
        cmd += ["--eval", args.eval]
    env = dict(os.environ)
    if args.profile is not None:
        env["BENCH_PROFILE"] = str(args.profile.resolve().with_name(f"{args.profile.stem}-{mode}.txt"))
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{mode} job failed:\n{done.stderr[-4000:]}")
    report = json.loads((out / "report.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    dense, pruned = report["metrics"]["dense"], report["metrics"]["pruned"]
    speed = None
    if "decode_tokens_per_s" in dense and "decode_tokens_per_s" in pruned:
        speed = pruned["decode_tokens_per_s"] / dense["decode_tokens_per_s"]
    return {
        **_tagged(done.stderr, "PEAKS"),
        "wall": wall,
        **job_summary(report),
        "speedup": speed,
    }


def capture_throughput(model: Path, args: argparse.Namespace) -> dict:
    sizes = (args.batch_size, args.repeats, args.device, args.num_samples, args.seq_len)
    profile = str(args.profile.with_name(args.profile.name + ".capture")) if args.profile else ""
    cmd = [sys.executable, "-c", _CAPTURE, str(model), args.calibration, *map(str, sizes), profile]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"capture bench failed:\n{done.stderr[-4000:]}")
    return _tagged(done.stdout, "CAPTURE")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "var" / "bench" / "llama-8b-shape")
    parser.add_argument("--tokenizer", type=Path, help="folder with the tokenizer (default: the demo model's)")
    parser.add_argument("--calibration", default="builtin")
    parser.add_argument("--eval", help="held-out text (default: the built-in evaluation split)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=16)  # the CLI's defaults but these two
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--modes", nargs="+", choices=["sequential", "resident"], default=["sequential", "resident"])
    parser.add_argument(
        "--profile",
        type=Path,
        help="write each job's cProfile (40 by cumulative, 25 by own time) beside this path, and the capture's "
        "torch.profiler tables (plain pass and capture, by device and host time) to PATH.capture",
    )
    parser.add_argument("--export-offline", type=Path, metavar="DIR", help="write the offline files; stop")
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument(
        "--no-capture", dest="capture", action="store_false", help="skip the capture's throughput (jobs only)"
    )
    args = parser.parse_args(argv)
    if args.export_offline is not None:
        export_offline(args.export_offline)
        return 0

    import torch

    from lorp.shards import Checkpoint

    gpu = torch.cuda.get_device_name(args.device)
    prepare(args.model, args.tokenizer, LLAMA_8B, args.device)
    size = Checkpoint(args.model).nbytes
    warm_caches(args.model)
    cap = capture_throughput(args.model, args) if args.capture else None
    print(f"capture: {cap}", flush=True)
    jobs = {}
    (ROOT / "var").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=ROOT / "var") as scratch:
        for mode in args.modes:
            jobs[mode] = got = run_job(args.model, mode, Path(scratch) / mode, args)
            print(
                f"{mode}: device peak {got['device'] / 2**30:.2f} GiB, host peak {got['host'] / 2**30:.2f} GiB, "
                f"{got['wall']:.0f} s, chose {got['chosen']}, {got['loads']} block loads",
                flush=True,
            )

    def row(mode: str, got: dict) -> str:
        t = got["timings"]
        return (
            f"| {mode} | {got['device'] / 2**30:.2f} | **{got['device'] / size:.3f}** | {got['host'] / 2**30:.2f} "
            f"| {got['wall']:.0f} | {t.get('capture', 0.0):.0f} | {t.get('selection', 0.0):.0f} | {got['loads']} "
            f"| {got['heal']} | {got['candidate']} {got['chosen']} |"
        )

    blocks = LLAMA_8B["num_hidden_layers"]
    compared = []
    if len(jobs) == 2:
        seq, res = jobs["sequential"], jobs["resident"]
        compared = [
            f"Both chose the same plan: {'yes' if seq['chosen'] == res['chosen'] else 'no'}. Sequential took "
            f"{seq['wall'] / res['wall']:.2f}x resident's wall time and {seq['device'] / res['device']:.3f}x its "
            "device memory.",
        ]
    if jobs.get("resident", {}).get("speedup"):
        compared.append(
            f"Resident decode speed, pruned against dense (batch 1): {jobs['resident']['speedup']:.3f}x "
            f"(bound {blocks / (blocks - BUDGET):.3f})."
        )
    cmd = "python scripts/bench_gpu.py" + (" --tokenizer DIR --calibration FILE --eval FILE" if args.tokenizer else "")
    if args.modes != ["sequential", "resident"]:
        cmd += " --modes " + " ".join(args.modes)
    section = [
        HEADING,
        "",
        f"Recorded {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{cmd}` on one {gpu} "
        f"(torch {torch.__version__}). Model: Llama-3.1-8B's shape with random bfloat16 weights, "
        f"{size / 1e9:.1f} GB; the job: `auto`, {BUDGET} blocks, {args.num_samples} x {args.seq_len} calibration "
        f"tokens, batch {args.batch_size}, {args.eval_windows} held-out windows, in bfloat16 on the GPU. Device "
        "peak is `torch.cuda.max_memory_allocated` in the job's process; host peak its peak resident memory.",
        "",
        "| job | device peak GiB | device peak / checkpoint | host peak GiB | wall s | capture s | selection s "
        "| block loads | heal | chosen |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        *(row(mode, got) for mode, got in jobs.items()),
        "",
        *([" ".join(compared), ""] if compared else []),
        *(
            [
                f"Capture throughput, resident, {cap['tokens']} tokens, batch {args.batch_size}, medians of "
                f"{args.repeats} interleaved repeats: plain forward through the blocks {cap['plain_tok_s']:.0f} "
                f"tok/s, capture (S and D) {cap['capture_tok_s']:.0f} tok/s, ratio **{cap['ratio']:.3f}** "
                "(target >= 0.97).",
                "",
            ]
            if cap
            else []
        ),
    ]
    print("\n".join(section))
    print("RAW " + json.dumps({"capture": cap, "jobs": jobs}), flush=True)
    replace_section(Path(args.out), HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
