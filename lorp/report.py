"""Run outputs besides the model: ``analysis.npz``, ``report.json`` and the charts (heat map, plans, budget curve)."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lorp.errors import InvalidRequestError, MissingStatisticError
from lorp.jsonable import json_safe
from lorp.result import BudgetCurve
from lorp.selection import REGISTRY

_VERSIONED = (
    "torch",
    "transformers",
    "numpy",
    "scikit-learn",
    "safetensors",
    "accelerate",
    "gguf",
    "lorp-service",
)


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a result depends on (provenance)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def save_analysis(path: str | Path, S: np.ndarray, D: np.ndarray | None, **extra: Any) -> Path:
    """Write S (and D) and small metadata arrays to an ``.npz`` file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"S": np.asarray(S, dtype=np.float64)}
    if D is not None:
        arrays["D"] = np.asarray(D, dtype=np.float64)
    for key, value in extra.items():
        arrays[key] = np.asarray(value)
    np.savez(out, **arrays)
    return out


def load_analysis(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read S and D from an ``.npz`` analysis, or S alone from a bare ``.npy`` (D is then None).

    Args:
        path: ``.npz`` holding arrays ``S`` and ``D``, or ``.npy`` holding S of shape (N+1)x(N+1).
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"similarity file not found: {p}", field="similarity")
    try:
        if p.suffix == ".npy":
            S = np.load(p, allow_pickle=False)
            D = None
        else:
            with np.load(p, allow_pickle=False) as data:
                if "S" not in data:
                    raise InvalidRequestError(f"{p} holds no array named 'S'", field="similarity")
                S = data["S"]
                D = data.get("D", None)
    except (ValueError, OSError) as exc:
        raise InvalidRequestError(f"cannot read {p} as .npz/.npy: {exc}", field="similarity") from exc
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 3:
        raise InvalidRequestError(f"S must be a square (N+1)x(N+1) matrix, got shape {S.shape}", field="similarity")
    if D is not None:
        D = np.asarray(D, dtype=np.float64)
        if D.shape != S.shape:
            raise MissingStatisticError(f"D has shape {D.shape} but S has {S.shape}", field="similarity")
    return S, D


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write the run report as pretty JSON (non-finite numbers become null)."""
    out = Path(path)
    out.write_text(json.dumps(json_safe(report), indent=2, sort_keys=False) + "\n")
    return out


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_heatmap(
    path: str | Path,
    S: np.ndarray,
    *,
    clusters: Sequence[int] | None = None,
    pruned: Sequence[int] = (),
    healed: Sequence[tuple[int, int]] = (),
    title: str = "",
) -> Path:
    """Draw S with LoRP's cluster boundaries (white lines) and the cut blocks marked (red), with a legend.

    Args:
        path: Output PNG.
        S: (N+1)x(N+1) similarity matrix; state l is the input of block l, state N the last output.
        clusters: LoRP's cluster label per block (length N), boundaries drawn where the label changes.
        pruned: Removed blocks, marked on both axes.
        healed: Healed spans [start, end): the square from state start-1 to state end is outlined
            (orange): block start-1 carries the fitted map that stands in for the span.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n_states = S.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    image = ax.imshow(S, cmap="viridis", vmin=min(0.0, float(S.min())), vmax=1.0, origin="upper")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="mean cosine similarity")
    if clusters is not None:
        for idx in range(1, len(clusters)):
            if clusters[idx] != clusters[idx - 1]:
                ax.axhline(idx - 0.5, color="white", linewidth=1.2)
                ax.axvline(idx - 0.5, color="white", linewidth=1.2)
    for block in pruned:
        ax.plot([block], [-0.9], marker="v", color="red", markersize=6, clip_on=False)
        ax.plot([-0.9], [block], marker=">", color="red", markersize=6, clip_on=False)
        ax.add_patch(plt.Rectangle((block - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    for start, end in healed:
        side = end - start + 2
        ax.add_patch(
            plt.Rectangle(
                (start - 1.5, start - 1.5), side, side, fill=False, edgecolor="orange", linewidth=1.4, linestyle="--"
            )
        )
    ax.set_xlim(-1.2, n_states - 0.5)
    ax.set_ylim(n_states - 0.5, -1.2)
    ax.set_xlabel("hidden state (input of block l; last = output of the last block)")
    ax.set_ylabel("hidden state")
    ax.set_title(title or f"S over {n_states - 1} blocks", fontsize=10)
    legend = []
    if clusters is not None:
        k = len(set(clusters))
        legend.append(Line2D([], [], color="white", linewidth=1.2, label=f"LoRP's K = {k} clusters (boundaries)"))
    if len(pruned):
        legend.append(Line2D([], [], color="red", marker="s", fillstyle="none", linestyle="", label="removed blocks"))
    if len(healed):
        legend.append(
            Line2D([], [], color="orange", linestyle="--", label="healed spans (map folded into the block before)")
        )
    if legend:
        ax.legend(handles=legend, loc="lower left", fontsize=8, facecolor="#444444", labelcolor="white", framealpha=0.9)
    return _save(fig, path)


def plot_plans(
    path: str | Path,
    scores: Mapping[str, float | None],
    *,
    measure: str = "validation perplexity",
    chosen: str,
    tasks: Sequence[tuple[str, float, float | None]] = (),
    title: str = "",
) -> Path:
    """Compare the candidate plans: each one's score (the chosen one marked) and, where downstream tasks
    were run, each task's score dense vs pruned.

    Args:
        path: Output PNG.
        scores: the score per candidate, lower better (None: not measured in full, left out).
        measure: what the scores are (the axis label): validation perplexity, or mean KL.
        chosen: the candidate that shipped.
        tasks: (label, dense value, pruned value) per task metric.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = sorted(((v, k) for k, v in scores.items() if v is not None and np.isfinite(v)), reverse=True)
    panels = 2 if tasks else 1
    height = max(2.6, 0.32 * len(measured) + 1.4)
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, height), dpi=110, squeeze=False)
    ax = axes[0][0]
    names = [k for _, k in measured]
    values = [v for v, _ in measured]
    colors = ["#d62728" if k == chosen else "#7f9fbf" for k in names]
    bars = ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), [f"{k} (chosen)" if k == chosen else k for k in names], fontsize=8)
    if values and min(values) > 0 and max(values) / min(values) > 20:  # (a KL may be 0: no log axis then)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 1.5, max(values) * 6)  # room for the last bar's label
    elif values:
        ax.set_xlim(0, max(values) * 1.18)
    for bar, value in zip(bars, values, strict=True):
        label = f" {value:,.0f}" if value >= 1000 else f" {value:.3g}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=7)
    ax.set_xlabel(f"{measure} of the plan (lower is better)")
    ax.set_title("candidate plans", fontsize=10)
    if tasks:
        ax2 = axes[0][1]
        x = np.arange(len(tasks))
        dense = [d for _, d, _ in tasks]
        pruned = [p if p is not None else np.nan for _, _, p in tasks]
        for offset, series, name, color in ((-0.2, dense, "dense", "#7f7f7f"), (0.2, pruned, "pruned", "#d62728")):
            bars = ax2.bar(x + offset, series, width=0.4, label=name, color=color)
            ax2.bar_label(bars, fmt="%.3f", fontsize=7)
        ax2.set_xticks(x, [label for label, _, _ in tasks], fontsize=8, rotation=20, ha="right")
        ax2.set_ylabel("task score (higher is better)")
        ax2.set_ylim(0, max(1.0, *(v for v in dense + pruned if np.isfinite(v))))
        ax2.set_title("downstream tasks, dense vs pruned", fontsize=10)
        ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def curve_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method's line: what it registered (``lorp.selection.register``), grey else."""
    info = REGISTRY.get(method)
    return (info.color, info.marker) if info is not None else ("#7f7f7f", "x")


def plot_budget_curve(
    path: str | Path,
    curve: BudgetCurve,
    *,
    chosen: tuple[str, int, float] | None = None,
    title: str = "",
) -> Path:
    """Validation perplexity against blocks removed, one line per method (and, on a curve drawn
    distilled, the best plan at each budget distilled, dotted), the dense model dashed.

    Args:
        path: Output PNG.
        curve: the scored plans.
        chosen: (candidate, blocks removed, validation perplexity) of the plan that shipped, starred.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=110)
    methods = list(dict.fromkeys(p.method for p in curve.points))
    values = [p.validation_perplexity for p in curve.points if np.isfinite(p.validation_perplexity)]
    for rank, method in enumerate(methods):
        points = sorted((p.budget, p.validation_perplexity) for p in curve.points if p.method == method)
        color, marker = curve_style(method)
        # Methods that agree draw over each other: the earlier lines are wider so each stays visible.
        ax.plot(
            [b for b, _ in points],
            [v for _, v in points],
            marker=marker,
            color=color,
            label=method,
            linewidth=1.2 + 1.6 * (len(methods) - 1 - rank) / max(len(methods) - 1, 1),
            markersize=5,
            alpha=0.85,
        )
    distilled = sorted((p.budget, p.distilled_perplexity) for p in curve.points if p.distilled_perplexity is not None)
    if distilled:  # the best plan at each budget, distilled (evaluation.curve_distill)
        ax.plot(
            [b for b, _ in distilled],
            [v for _, v in distilled],
            marker="D",
            color="#000000",
            linestyle=":",
            label="best plan, distilled",
            linewidth=1.6,
            markersize=5,
        )
        values += [v for _, v in distilled if np.isfinite(v)]
    dense = curve.dense_validation_perplexity
    ax.axhline(dense, color="#444444", linestyle="--", linewidth=1, label=f"dense ({dense:.3g})")
    if chosen is not None:
        name, n, score = chosen
        ax.plot([n], [score], marker="*", markersize=16, color="#000000", linestyle="none", label=f"shipped: {name}")
        values.append(score)
    if values and max(values) / max(min([*values, dense]), 1e-12) > 20:
        ax.set_yscale("log")
    budgets = sorted({p.budget for p in curve.points})
    if budgets:
        ax.set_xticks(budgets)
    ax.set_xlabel("blocks removed")
    ax.set_ylabel(f"validation perplexity{', healed' if curve.healed else ''} (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
