"""The README's first command: start the embedded service, prune the demo model through the API.

Starts `lorp serve` (API + worker, SQLite, local artifacts under LORP_DATA_DIR, default var/demo),
submits a job on the demo model (SmolLM2-135M) with the built-in corpus, shows its progress, prints
the summary and where the pruned model is, then stops the service.

    python scripts/demo.py [--num-layers 4] [--method auto] [--num-samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with status {proc.returncode}; see its log above")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the service did not become ready in time")


def bar(fraction: float, width: int = 30) -> str:
    done = round(width * fraction)
    return "#" * done + "-" * (width - done)


def print_summary(job: dict, base: str, data_dir: Path) -> None:
    summary = job.get("summary") or {}
    print()
    print(f"job {job['id']}: {job['status']}")
    if job["status"] != "succeeded":
        print(f"error: {job.get('error')}")
        return
    print(f"RLS / K          {summary.get('rls')} / {summary.get('k')}")
    print(f"chosen           {summary.get('chosen_method')} -> blocks {summary.get('pruned_layers')}")
    plans = [p for p in summary.get("plans", []) if p.get("validation_perplexity") is not None]
    if plans:
        print("candidates       (validation perplexity on held-out calibration text)")
        for plan in sorted(plans, key=lambda p: p["validation_perplexity"]):
            mark = "*" if plan.get("chosen") else " "
            print(f"  {mark} {plan['name']:<11} {plan['validation_perplexity']:>10.2f}  {plan['pruned_layers']}")
    metrics = summary.get("metrics", {})
    dense, pruned, ratio = metrics.get("dense", {}), metrics.get("pruned", {}), metrics.get("ratio", {})

    def value(group: dict, name: str) -> float | None:
        item = group.get(name)
        return item.get("value") if isinstance(item, dict) else item

    if value(dense, "perplexity") is not None:
        print(f"perplexity       dense {value(dense, 'perplexity'):.2f} -> pruned {value(pruned, 'perplexity'):.2f}")
    if value(ratio, "decode_speedup") is not None:
        print(
            f"decode speed-up  x{value(ratio, 'decode_speedup'):.2f} "
            f"(bound N/(N-n) = {value(ratio, 'speedup_bound'):.2f})"
        )
    artifacts = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts", timeout=10).json()
    model_dir = data_dir / "artifacts" / "jobs" / job["id"] / "model"
    print(f"artifacts        {len(artifacts)} files, e.g. {base}/v1/jobs/{job['id']}/artifacts/report.json")
    print(f"pruned model     {model_dir.resolve()}")
    print(f"                 (AutoModelForCausalLM.from_pretrained('{model_dir.resolve()}'))")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--method", default="auto")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data-dir", default=os.environ.get("LORP_DATA_DIR", "var/demo"))
    args = parser.parse_args(argv)

    data_dir = Path(args.data_dir)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LORP_DATA_DIR": str(data_dir)}
    lorp = Path(sys.executable).with_name("lorp")
    print(f"starting the embedded service on {base} (data in {data_dir}/)", flush=True)
    proc = subprocess.Popen([str(lorp), "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=REPO)
    try:
        wait_ready(base, proc)
        body = {
            "model": {"id": "demo"},
            "method": args.method,
            "target": {"num_layers": args.num_layers},
            "calibration": {"dataset": "builtin", "num_samples": args.num_samples, "seq_len": args.seq_len},
        }
        resp = httpx.post(f"{base}/v1/jobs", json=body, timeout=30)
        if resp.status_code >= 400:
            print(resp.text, file=sys.stderr)
            return 1
        job = resp.json()
        print(f"submitted job {job['id']} ({resp.headers.get('location')})", flush=True)
        last = None
        while True:
            job = httpx.get(f"{base}/v1/jobs/{job['id']}", timeout=10).json()
            line = f"\r{job['status']:<10} {job.get('stage') or '':<18} [{bar(job['progress'])}] {job['progress']:5.1%}"
            if line != last:
                print(line, end="", flush=True)
                last = line
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        print_summary(job, base, data_dir)
        return 0 if job["status"] == "succeeded" else 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
