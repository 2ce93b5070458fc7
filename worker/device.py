"""What a worker runs jobs on, found without touching CUDA (its pool children fork from this process).

A GPU is described by ``nvidia-smi`` (name, memory, count); a CPU-only host by its processor's name
and its memory. ``budget_bytes`` is ``LORP_DEVICE_MEMORY_GB`` when set: the memory budget the engine
uses to choose between resident and sequential execution (``lorp.execution.choice``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import torch

from lorp.execution.choice import DEVICE_MEMORY_ENV, device_name


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


def _host_memory() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def describe_device() -> dict[str, Any]:
    """``{"kind", "name", "count", "memory_bytes", "budget_bytes"}`` of the device jobs here run on
    (the first GPU when there are any; ``memory_bytes`` is one GPU's, or the host's for the CPU)."""
    setting = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    try:
        budget = int(float(setting) * 1e9) if setting else None
    except ValueError:
        budget = None  # the engine refuses it with a message naming the setting, job by job
    gpus = _gpus()
    if gpus:
        name, memory = gpus[0]
        return {"kind": "cuda", "name": name, "count": len(gpus), "memory_bytes": memory, "budget_bytes": budget}
    return {
        "kind": "cpu",
        "name": device_name(torch.device("cpu")),
        "count": os.cpu_count() or 1,
        "memory_bytes": _host_memory(),
        "budget_bytes": budget,
    }
