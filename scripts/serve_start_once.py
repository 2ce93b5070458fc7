"""One start of ``lorp serve`` (embedded) until its worker has published the downstream-task catalogue
and registered (``/readyz`` lists its device), then a stop (SIGINT): prints the seconds to the
catalogue, to the registration and to the end of the stop, and the resident memory of the worker's
Celery main process once registered.

A whole process for ``farm-bench`` to time side by side with another version of the code (each run
in its own git worktree, with ``PYTHONPATH`` set to it), as docs/benchmarks.md ("Worker start")
records:

    farm-bench -n 5 --warmup 1 --vs 'sh -c "cd OLD && PYTHONPATH=OLD exec python scripts/serve_start_once.py"' \
        -- sh -c "cd NEW && PYTHONPATH=NEW exec python scripts/serve_start_once.py"

``--log FILE`` appends the two figures to FILE (farm-bench throws a command's output away).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, help="a file the figures are appended to")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        (work / "models").mkdir()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
        env.update(LORP_DATA_DIR=str(work / "data"), LORP_MODEL_ROOTS=json.dumps([str(work / "models")]))
        started = time.monotonic()
        serve = subprocess.Popen(
            [str(Path(sys.executable).with_name("lorp")), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        published = None
        while published is None and time.monotonic() - started < args.timeout:
            try:
                listed = httpx.get(f"http://127.0.0.1:{port}/v1/tasks", params={"source": "built-in"}, timeout=5).json()
                if listed["total"] and listed["published_at"]:
                    published = time.monotonic() - started
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        registered, main_mib = None, None
        while published is not None and registered is None and time.monotonic() - started < args.timeout:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["checks"]["workers"].get("devices"):
                    registered = time.monotonic() - started
                    celery = [p for p in psutil.Process(serve.pid).children() if "celery" in " ".join(p.cmdline())]
                    main_mib = celery[0].memory_info().rss / 2**20 if celery else None
            except (httpx.HTTPError, ValueError, KeyError, psutil.Error):
                pass
            time.sleep(0.1)
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(timeout=60)
        total = time.monotonic() - started
    if published is None:
        print(f"no catalogue within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    line = f"catalogue published {published:.2f} s, start and stop {total:.2f} s"
    if registered is not None and main_mib is not None:
        line += f", registered {registered:.2f} s, worker main process {main_mib:.0f} MiB"
    print(line)
    if args.log is not None:
        with args.log.open("a") as log:
            log.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
