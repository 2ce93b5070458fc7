"""Run outputs besides the model: ``analysis.npz``, ``report.json`` and ``heatmap.png``."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lorp.errors import InvalidRequestError, MissingStatisticError
from lorp.jsonable import json_safe

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
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
