"""Figures of the reliability suites: each scenario records what was tried and what happened.

Every scenario writes one JSON file. A plain test run (`make test`) writes them under the ignored
folder `var/reliability/`, so running the tests never rewrites committed files; `make reliability`,
the deliberate recording, sets `LORP_RELIABILITY_RESULTS=docs/reliability` and then renders those
files into docs/reliability.md with `python scripts/reliability_report.py`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "var" / "reliability"


def full_size() -> bool:
    """Whether the scenarios run at the size their figures are recorded at: ``make reliability`` sets
    ``LORP_RELIABILITY_SIZE=full``; a plain test run (CI) runs smaller loops that take every path."""
    return os.environ.get("LORP_RELIABILITY_SIZE") == "full"


def results_dir() -> Path:
    """Where this run's records go: ``LORP_RELIABILITY_RESULTS`` (relative to the repository), else var/."""
    configured = os.environ.get("LORP_RELIABILITY_RESULTS")
    return (REPO / configured).resolve() if configured else DEFAULT_RESULTS


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
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
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
    path = results / f"{slug}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return path


class HostileCases:
    """The cases of one hostile-input module, each with the answer observed, recorded as one scenario.

    ``note`` keeps a case's answer (temporary paths and random bucket names, which say nothing to a
    reader of docs/reliability.md, scrubbed); ``recording`` is the body of the module's autouse
    fixture: it times the module and records what was noted.
    """

    def __init__(self, scenario: str, command: str, notes: str) -> None:
        self.scenario, self.command, self.notes = scenario, command, notes
        self.outcomes: dict[str, str] = {}

    def note(self, case: str, outcome: str) -> None:
        self.outcomes[case] = re.sub(r"lorp-[0-9a-f]{12}", "<bucket>", re.sub(r"/tmp/\S*/", "…/", outcome))

    def recording(self) -> Iterator[None]:
        started = time.monotonic()
        yield
        if self.outcomes:
            record(
                suite="hostile",
                scenario=self.scenario,
                runs=len(self.outcomes),
                outcomes=dict(sorted(self.outcomes.items())),
                data_lost=0,
                command=self.command,
                notes=self.notes,
                figures={"cases": len(self.outcomes), "seconds": round(time.monotonic() - started, 1)},
            )
