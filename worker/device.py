"""What a worker runs jobs on, found without importing torch or touching CUDA (``lorp.host``): the
Celery main process that describes it runs no job (its pool children come from a fork server that
imports the engine, ``worker.pool``), so it never loads torch at all.

A GPU is described by ``nvidia-smi`` (name, memory, count); a CPU-only host by its processor's name
and its memory. ``budget_bytes`` is ``LORP_DEVICE_MEMORY_GB`` when set: the memory budget the engine
uses to choose between resident and sequential execution (``lorp.execution.choice``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from lorp.errors import InvalidRequestError
from lorp.host import cpu_name, memory_setting, total_memory


def _gpus() -> list[tuple[str, int]]:
    """(name, memory in bytes) of each GPU ``nvidia-smi`` lists; none without it."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in done.stdout.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            found.append((name.strip(), int(mib.strip()) * 2**20))
    return found


def describe_device() -> dict[str, Any]:
    """``{"kind", "name", "count", "memory_bytes", "budget_bytes"}`` of the device jobs here run on
    (the first GPU when there are any; ``memory_bytes`` is one GPU's, or the host's for the CPU)."""
    try:
        setting = memory_setting()
    except InvalidRequestError:
        setting = None  # the engine refuses it with a message naming the setting, job by job
    budget = setting[0] if setting is not None else None
    gpus = _gpus()
    if gpus:
        name, memory = gpus[0]
        return {"kind": "cuda", "name": name, "count": len(gpus), "memory_bytes": memory, "budget_bytes": budget}
    return {
        "kind": "cpu",
        "name": cpu_name(),
        "count": os.cpu_count() or 1,
        "memory_bytes": total_memory(),
        "budget_bytes": budget,
    }
