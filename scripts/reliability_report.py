"""Render docs/reliability/*.json (written by the reliability suites) into docs/reliability.md.

python scripts/reliability_report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "reliability"
SUITES = {
    "faults": "Faults (real Postgres, Redis, Celery workers, S3 server on loopback)",
    "load": "Load",
    "hostile": "Hostile input",
}


def _fmt(value: object) -> str:
    if isinstance(value, dict):
        items = list(value.items())
        shown = ", ".join(f"{k}: {_fmt(v)}" for k, v in items[:12])
        return shown if len(items) <= 12 else f"{shown}, ... ({len(items)} entries)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ... ({len(value)} values)]"
    return str(value)


def render() -> str:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = [
        "# Reliability",
        "",
        "What the fault-injection, load and hostile-input suites tried, how often, and what happened.",
        "Each row is written by the test that ran it (`tests/reliability/`); regenerate this page with",
        "`python scripts/reliability_report.py`. Data lost must be 0 everywhere.",
        "",
    ]
    for suite, title in SUITES.items():
        chosen = [r for r in rows if r["suite"] == suite]
        if not chosen:
            continue
        lines += [
            f"## {title}",
            "",
            "| scenario | runs | outcome | data lost | figures | reproduce |",
            "|---|---:|---|---:|---|---|",
        ]
        for r in chosen:
            figures = _fmt(r.get("figures") or {}) or "-"
            note = f" {r['notes']}" if r.get("notes") else ""
            lines.append(
                f"| {r['scenario']} | {r['runs']} | {_fmt(r['outcomes'])}.{note} | {r['data_lost']} | {figures} "
                f"| `{r['command']}` |"
            )
        lines += ["", f"Recorded on {chosen[0]['machine']}, latest run {max(r['recorded_at'] for r in chosen)}.", ""]
    return "\n".join(lines)


def main() -> int:
    text = render()
    (ROOT / "docs" / "reliability.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
