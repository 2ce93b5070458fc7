"""The README's first command: start the embedded service, prune the demo model through the API (with the
Python client, lorp_client).

Starts `lorp serve` (API + worker, SQLite, local artifacts under LORP_DATA_DIR, default var/demo; its
log goes to service.log there), submits a job on the demo model (SmolLM2-135M) with the built-in
corpus, shows its progress, stops the service, and prints what the job found and the local files
it made.

    python scripts/demo.py [--model demo] [--num-layers 4] [--method auto] [--num-samples 32] [--seq-len 256]
                           [--task lorp_cloze] [--task-limit 100]

The job also runs the built-in offline downstream task (lorp_cloze, through lm-evaluation-harness)
on both models, completes a few fixed prompts with each, and scores every method's plan at several
budgets (the budget curve); the output shows all three.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from lorp_client import ApiError, Client, JobOut

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "model": "the pruned model, a Hugging Face directory",
    "report.json": "everything below, with provenance and stage timings",
    "heatmap.png": "S with LoRP's clusters (white lines) and the removed blocks (red)",
    "plans.png": "the candidate plans compared, and the task's score dense vs pruned",
    "budgets.png": "each method's validation perplexity against blocks removed",
    "analysis.npz": "S and D, the similarity and angular-distance matrices",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(client: Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the service exited with status {proc.returncode}; the end of {log}:\n{tail}")
        try:
            client.ready()
            return
        except (httpx.HTTPError, ApiError):
            time.sleep(0.5)
    raise SystemExit(f"the service did not become ready in time; see {log}")


def wait_for_tasks(client: Client, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180.0) -> None:
    """The worker lists the tasks it can run as it starts; a job naming a task waits for that list."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with status {proc.returncode}; see {log}")
        if client.tasks(limit=1).total:
            return
        time.sleep(0.5)
    raise SystemExit(f"the worker published no downstream tasks in time (is the 'eval' extra installed?); see {log}")


def bar(fraction: float, width: int = 30) -> str:
    done = round(width * fraction)
    return "#" * done + "-" * (width - done)


def human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def duration(job: dict[str, Any]) -> str:
    created = dt.datetime.fromisoformat(job["created_at"])
    finished = dt.datetime.fromisoformat(job["finished_at"]) if job.get("finished_at") else created
    seconds = round((finished - created).total_seconds())
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def why_chosen(summary: dict[str, Any]) -> str | None:
    """One line on how ``auto`` chose, naming LoRP's own plan when another one won."""
    scored = {p["name"]: p["validation_perplexity"] for p in summary.get("plans", [])}
    chosen = summary.get("chosen_method")
    if chosen not in scored or scored[chosen] is None:
        return None
    if chosen == "lorp":
        return f"auto kept LoRP's own plan: the lowest validation perplexity ({scored['lorp']:.2f})"
    lorp = scored.get("lorp")
    if lorp is None:
        return (
            f"auto chose {chosen} (validation perplexity {scored[chosen]:.2f}); LoRP's own plan screened "
            "worse than the finalists measured in full"
        )
    return (
        f"auto chose {chosen} over LoRP's own plan: validation perplexity {scored[chosen]:.2f} "
        f"vs LoRP's {lorp:.2f} (lower is better)"
    )


def print_summary(job: dict[str, Any]) -> None:
    summary = job.get("summary") or {}
    metrics = summary.get("metrics", {})
    dense, pruned, ratio = metrics.get("dense", {}), metrics.get("pruned", {}), metrics.get("ratio", {})
    n = summary.get("num_blocks")
    if summary.get("rls") is not None:
        print(f"RLS / K          {summary['rls']:.3f} / {summary['k']}")
    removed = summary.get("pruned_layers") or []
    print(f"chosen           {summary.get('chosen_method')}: removes {len(removed)} of {n} blocks {removed}")
    reason = why_chosen(summary) if job["request"].get("method") == "auto" else None
    if reason:
        print(f"                 {reason}")
    worker = summary.get("report") or {}
    heal = worker.get("heal") or {}
    healed = heal.get("method") == "linear"
    for span in heal.get("spans", []):
        print(
            f"healed           blocks [{span['start']}, {span['end']}) by a map folded into block {span['anchor']}: "
            f"residual {span['residual_before']:.3f} -> {span['residual_after']:.3f}"
        )
    if heal.get("method") == "none":
        print(f"healed           no: {heal.get('reason')}")
    plans = [p for p in summary.get("plans", []) if p.get("validation_perplexity") is not None]
    if plans:
        scored = "healed, " if healed else ""
        print(f"candidates       validation perplexity ({scored}on held-out calibration text)")
        for plan in sorted(plans, key=lambda p: p["validation_perplexity"]):
            mark = "*" if plan.get("chosen") else " "
            print(f"  {mark} {plan['name']:<11} {plan['validation_perplexity']:>9.2f}  {plan['pruned_layers']}")
    if dense.get("perplexity") is not None and pruned.get("perplexity") is not None:
        print(f"perplexity       dense {dense['perplexity']:.2f} -> pruned {pruned['perplexity']:.2f} (held-out text)")
    if pruned.get("kl_mean") is not None:
        print(
            f"vs dense         KL {pruned['kl_mean']:.4f} nats mean, {pruned['kl_p99']:.3f} p99; "
            f"same top token {pruned['top1_agreement']:.1%} (held-out text)"
        )
    if ratio.get("decode_speedup") is not None:
        print(
            f"decode speed-up  x{ratio['decode_speedup']:.2f} "
            f"(bound N/(N-n) = {ratio['speedup_bound']:.2f}; measured on this machine's CPU)"
        )


def print_evidence(summary: dict[str, Any]) -> None:
    """The downstream task dense vs pruned, the budget curve, and the completions side by side."""
    worker = summary.get("report") or {}
    for row in worker.get("tasks") or []:
        dense, pruned = row.get("dense"), row.get("pruned")
        if dense is None or pruned is None:
            continue
        print(f"task             {row['task']} {row['metric']}: dense {dense:.3f} -> pruned {pruned:.3f} "
              f"({row.get('num_samples')} items)")  # fmt: skip
    curve = summary.get("budget_curve") or {}
    points = curve.get("points") or []
    if points:
        budgets = sorted({p["budget"] for p in points})
        scores = {(p["method"], p["budget"]): p["validation_perplexity"] for p in points}
        dense = curve.get("dense_validation_perplexity")
        reference = f" (dense {dense:.2f})" if dense is not None else ""
        print(f"budget curve     validation perplexity by blocks removed{reference}")
        print("  blocks removed" + "".join(f"{n:>9}" for n in budgets))
        for method in dict.fromkeys(p["method"] for p in points):
            cells = [scores.get((method, n)) for n in budgets]
            print(f"  {method:<14}" + "".join("        -" if v is None else f"{v:>9.2f}" for v in cells))
    for generation in worker.get("generations") or []:
        print(f"prompt           {generation['prompt']!r}")
        print(f"  dense          {generation['dense']!r}")
        print(f"  pruned         {generation['pruned']!r}")


def print_outputs(folder: Path) -> None:
    print(f"outputs in       {folder}/")
    for name, what in FILES.items():
        path = folder / name
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            size = f"{len(files)} files, {human_bytes(sum(p.stat().st_size for p in files))}"
            shown = name + "/"
        elif path.is_file():
            size, shown = human_bytes(path.stat().st_size), name
        else:
            continue
        print(f"  {shown:<14} {size:>20}  {what}")
    print(f"load it with     AutoModelForCausalLM.from_pretrained('{folder / 'model'}')")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run_job(client: Client, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        job = client.submit(body)
    except ApiError as exc:
        print(f"the service refused the job: {exc}", file=sys.stderr)
        return None
    print(f"submitted job    {job.id}", flush=True)

    def show(job: JobOut) -> None:
        line = f"\r{job.status:<10} {job.stage or '':<18} [{bar(job.progress)}] {job.progress:6.1%}"
        print(line, end="", flush=True)

    final = client.wait(job.id, on_progress=show, poll_interval=1.0, max_interval=2.0)
    print(flush=True)
    return final.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo, or a model under LORP_MODEL_ROOTS")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--task", default="lorp_cloze", help="an lm-eval task to run dense and pruned ('' for none)")
    parser.add_argument("--task-limit", type=int, default=100, help="items of the task to run")
    parser.add_argument("--data-dir", default=os.environ.get("LORP_DATA_DIR", "var/demo"))
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "service.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # The embedded mode whatever the shell exports: everything under the data folder.
    env = {k: v for k, v in os.environ.items() if k not in ("LORP_DATABASE_URL", "LORP_BROKER_URL", "LORP_STORAGE_URL")}
    env.update(LORP_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    lorp = Path(sys.executable).with_name("lorp")
    print(f"starting         the embedded service on {base} (data in {data_dir}/, log in {log.name})", flush=True)
    with log.open("ab") as log_file:
        proc = subprocess.Popen(
            [str(lorp), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    client = Client(base)
    try:
        wait_ready(client, proc, log)
        if args.task:
            wait_for_tasks(client, proc, log)
        body = {
            "model": {"id": args.model},
            "method": args.method,
            "target": {"num_layers": args.num_layers},
            "calibration": {"dataset": "builtin", "num_samples": args.num_samples, "seq_len": args.seq_len},
            "evaluation": {"tasks": [{"name": args.task, "limit": args.task_limit}] if args.task else []},
        }
        job = run_job(client, body)
    finally:
        client.close()
        stop(proc)
    if job is None:
        return 1
    print(f"job {job['id']}: {job['status']} in {duration(job)}")
    if job["status"] != "succeeded":
        print(f"error            {job.get('error')}")
        print(f"service log      {log}")
        return 1
    print_summary(job)
    print_evidence(job["summary"])
    prefix = ((job["summary"].get("report") or {}).get("artifacts") or {}).get("prefix", f"jobs/{job['id']}")
    print_outputs(data_dir / "artifacts" / prefix)
    print(f"the service has stopped; `LORP_DATA_DIR={args.data_dir} lorp serve` serves this job again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
