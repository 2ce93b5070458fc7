"""The host a job runs on, read without torch: its CPU's model name, its memory, and the memory
budget an operator sets (``LORP_DEVICE_MEMORY_GB``).

``lorp.execution.choice`` sizes jobs with these; a worker's main process describes its device with
them (``worker.device``) and so never imports torch: its pool children come from a fork server that
has, and the main process stays small and starts its consumer sooner.
"""

from __future__ import annotations

import os

from lorp.errors import InvalidRequestError

DEVICE_MEMORY_ENV = "LORP_DEVICE_MEMORY_GB"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``cpu`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def total_memory() -> int:
    """The host's physical memory in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def available_memory() -> int:
    """The host's available memory in bytes (``MemAvailable``), or its physical memory where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory()


def memory_setting() -> tuple[int, str] | None:
    """``LORP_DEVICE_MEMORY_GB`` in bytes and as written (``NAME=value``), or None when unset.

    Raises:
        InvalidRequestError: naming the setting, when it is not a positive number.
    """
    setting = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    if not setting:
        return None
    try:
        gb = float(setting)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise InvalidRequestError(
            f"{DEVICE_MEMORY_ENV} must be a positive number of GB, got {setting!r}", field=DEVICE_MEMORY_ENV
        )
    return int(gb * 1e9), f"{DEVICE_MEMORY_ENV}={setting}"
