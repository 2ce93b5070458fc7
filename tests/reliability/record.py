"""Figures of the reliability suites: each scenario records what was tried and what happened.

Every scenario writes one JSON file under docs/reliability/ (committed with the code that produced
it); `python scripts/reliability_report.py` renders them into docs/reliability.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "reliability"


def record(
    suite: str,
    scenario: str,
    *,
    runs: int,
    outcomes: dict[str, Any],
    data_lost: int,
    command: str,
    notes: str = "",
    figures: dict[str, Any] | None = None,
) -> Path:
    """Write one scenario's result (overwriting the previous run of the same scenario).

    Args:
        suite: ``faults``, ``load`` or ``hostile``.
        scenario: short name, e.g. ``kill -9 worker during capture``.
        runs: how many times the scenario was tried in this run.
        outcomes: what happened, e.g. ``{"succeeded": 3, "attempts": [2, 2, 2]}``.
        data_lost: jobs, rows or artifacts lost (must be 0).
        command: the command that reproduces it.
        notes: one or two sentences a reader needs.
        figures: numbers to show (latencies, throughput ...).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{suite}-{scenario}".lower()).strip("-")
    payload = {
        "suite": suite,
        "scenario": scenario,
        "runs": runs,
        "outcomes": outcomes,
        "data_lost": data_lost,
        "command": command,
        "notes": notes,
        "figures": figures or {},
        "recorded_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    path = RESULTS / f"{slug}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path
