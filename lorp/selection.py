"""Block selection: LoRP (docs/algorithm.md §3-6) and its baselines (§7) as pure functions of (S, D, n, options).

``S`` is the (N+1) x (N+1) mean cosine-similarity matrix of the hidden states (row/column ``l < N`` is
the input of block ``l``, row/column ``N`` the output of the last block) and ``D`` the matching mean
angular-distance matrix, which may be absent when only a bare S was supplied. Nothing here touches a
model, the disk or torch: every method is a deterministic function of its arguments (the spectral
clustering is seeded), so the same inputs always give the same plan.

Every method registers here once (:data:`REGISTRY`), and every list of methods elsewhere derives
from it. ``auto`` and ``search`` are declared, not implemented, here: they score plans (``auto`` the
plans of :func:`candidate_plans`) with the model and live with the code that can run it
(``lorp.planner``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from lorp.errors import BudgetError, InvalidRequestError, MissingStatisticError
from lorp.options import SelectionOptions

Matrix = npt.NDArray[np.float64]

# Cosine similarities are means of dot products of unit vectors, so they lie in [-1, 1] up to rounding;
# anything further out means the file is not a similarity matrix at all.
_RANGE_TOLERANCE = 1e-6
_SYMMETRY_TOLERANCE = 1e-6

# The K values that "auto" validates besides LoRP's own choice (docs/algorithm.md §7).
AUTO_K_VALUES = (2, 3, 4, 5, 6)
# auto also validates LLM-Streamline's runners-up: the contiguous run with the largest S[s, s+n] is
# often not the one that validates best, and contiguous runs are where a healed map helps most
# (docs/benchmarks.md, "Healed and searched plans").
RUNNER_UP_RUNS = 3


@dataclass(frozen=True)
class Structure:
    """LoRP's analysis of S, independent of the method that finally chooses the blocks.

    Attributes:
        rls: Representation Locality Score, ``None`` when the mean off-diagonal similarity is <= 0.
        k: the granularity used (the override, or the RLS table clamped to N).
        clusters: cluster of every block (length N), numbered by the depth of the first member.
        redundancy: r(l) of every block (docs/algorithm.md §6); ``-inf`` for a block alone in its cluster.
    """

    rls: float | None
    k: int
    clusters: list[int]
    redundancy: list[float]


@dataclass(frozen=True)
class Selection:
    """A pruning plan.

    Attributes:
        method: the method (or candidate key) that produced the plan.
        pruned_layers: blocks to remove, sorted ascending, 0-based.
        structure: LoRP's structure of S, reported for every method.
        scores: the per-block (or per-start) scores the method ranked by; may be empty.
    """

    method: str
    pruned_layers: list[int]
    structure: Structure
    scores: dict[str, list[float]]


class MethodFn(Protocol):
    """Signature of a registered selection method."""

    def __call__(
        self,
        S: npt.ArrayLike,
        D: npt.ArrayLike | None,
        n: int,
        options: SelectionOptions | None = None,
        *,
        structure: Structure | None = None,
    ) -> Selection: ...


Variants = Callable[[Matrix, "Matrix | None", int, SelectionOptions, Selection], dict[str, Selection]]


@dataclass(frozen=True)
class MethodInfo:
    """Everything the house knows about one method, registered once (:func:`register`, :func:`declare`).

    Every list of methods derives from :data:`REGISTRY`: the job spec's ``method`` (``lorp.spec``),
    auto's candidates (:func:`candidate_plans`), the budget curve (``lorp.curve``), the plot styles
    (``lorp.report``), ``POST /v1/plans``'s default methods, ``GET /v1/methods`` (the web form's and the
    client's choices) and ``lorp prune --method``.

    Attributes:
        name: the public name, as requests and reports spell it.
        label: one line saying what the method does, for help texts and the web form.
        plan: the plan function of S, D and n; ``None`` for a method that scores plans on the model
            (``auto``, ``search``: they live in ``lorp.planner`` and need a job, not only S and D).
        validated: ``auto`` scores this method's plan (and its :attr:`variants`) among its candidates.
        curve: the budget curve draws this method's plan at every budget.
        color, marker: its line in the plots (matplotlib colour and marker).
        needs_distance: the plan needs D (a bare S cannot give it; auto and the curve skip it then).
        variants: further candidates ``auto`` validates beside the method's own plan, by key.
    """

    name: str
    label: str
    plan: MethodFn | None
    validated: bool
    curve: bool
    color: str
    marker: str
    needs_distance: bool = False
    variants: Variants | None = None

    @property
    def needs_model(self) -> bool:
        return self.plan is None


# Every method by name, in registration order (the order auto lists its candidates in).
REGISTRY: dict[str, MethodInfo] = {}
# The one-pass methods' plan functions by name: a view of REGISTRY kept by register().
METHODS: dict[str, MethodFn] = {}


def _add(info: MethodInfo) -> None:
    if info.name in REGISTRY:
        raise ValueError(f"method {info.name!r} is registered twice")
    REGISTRY[info.name] = info
    if info.plan is not None:
        METHODS[info.name] = info.plan


def register(
    name: str,
    *,
    label: str,
    color: str,
    marker: str,
    validated: bool = True,
    curve: bool = True,
    needs_distance: bool = False,
    variants: Variants | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """A decorator adding a one-pass selection method (a plan from S, D and n) to :data:`REGISTRY`.

    The keywords are :class:`MethodInfo`'s; the decorated function is its ``plan``, returned unchanged.
    """

    def decorator(fn: MethodFn) -> MethodFn:
        _add(MethodInfo(name, label, fn, validated, curve, color, marker, needs_distance, variants))
        return fn

    return decorator


def declare(name: str, *, label: str, color: str, marker: str) -> None:
    """Add a method that scores plans on the model (no plan function here: ``lorp.planner`` runs it)."""
    _add(MethodInfo(name, label, None, validated=False, curve=False, color=color, marker=marker))


def unregister(name: str) -> None:
    """Remove a method (for a test that registered a toy one); unknown names are ignored."""
    REGISTRY.pop(name, None)
    METHODS.pop(name, None)


def method_names() -> list[str]:
    """The one-pass methods' names, sorted (the ones :func:`select` runs from S and D alone)."""
    return sorted(METHODS)


def all_methods() -> list[str]:
    """Every method a job may name, in registration order (the model-scored ones first)."""
    return list(REGISTRY)


def plan_methods() -> list[str]:
    """The one-pass methods, in registration order (``POST /v1/plans`` lists these by default)."""
    return [name for name, info in REGISTRY.items() if not info.needs_model]


def scored_methods() -> list[str]:
    """The methods that score plans on the model (a job's report names the candidate they chose)."""
    return [name for name, info in REGISTRY.items() if info.needs_model]


def curve_methods() -> list[str]:
    """The methods the budget curve draws at every budget, in registration order."""
    return [name for name, info in REGISTRY.items() if info.curve]


def check_method(name: str) -> str:
    """``name`` if a method of that name is registered, else ValueError listing the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(all_methods())}")
    return name


def method_row(info: MethodInfo) -> dict[str, Any]:
    """A method as ``GET /v1/methods`` and ``lorp methods --json`` list it."""
    return {
        "name": info.name,
        "label": info.label,
        "needs_model": info.needs_model,
        "auto_candidate": info.validated,
        "on_curve": info.curve,
        "needs_distance": info.needs_distance,
    }


# The methods that need the model: auto and search score candidate plans (lorp.planner).
declare(
    "auto",
    label="validate every one-pass method's plans (and LoRP at other K) on held-out windows; ship the best",
    color="#000000",
    marker="*",
)
declare(
    "search",
    label="grow the plan a block at a time, each step keeping the block whose removal scores best (greedy)",
    color="#ff7f0e",
    marker="D",
)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _as_similarity(S: npt.ArrayLike) -> Matrix:
    """Validate S and return it as a float64 array (see :func:`num_blocks`)."""
    try:
        m = np.asarray(S, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"the similarity matrix S is not a numeric array: {exc}", field="similarity") from exc
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InvalidRequestError(
            f"the similarity matrix S must be square, (N+1) x (N+1); got shape {m.shape}",
            field="similarity",
        )
    if m.shape[0] < 3:
        raise InvalidRequestError(
            f"the similarity matrix S must cover at least N = 2 blocks ((N+1) x (N+1) = 3 x 3); got shape {m.shape}",
            field="similarity",
        )
    if not np.all(np.isfinite(m)):
        raise InvalidRequestError("the similarity matrix S contains NaN or infinite values", field="similarity")
    if np.abs(m).max() > 1.0 + _RANGE_TOLERANCE:
        raise InvalidRequestError(
            f"the similarity matrix S holds values outside [-1, 1] (max |S| = {np.abs(m).max():.6g}); "
            "it must hold mean cosine similarities",
            field="similarity",
        )
    if not np.allclose(m, m.T, rtol=0.0, atol=_SYMMETRY_TOLERANCE):
        raise InvalidRequestError("the similarity matrix S is not symmetric", field="similarity")
    return m


def _as_distance(D: npt.ArrayLike | None, shape: tuple[int, ...]) -> Matrix:
    """Validate the angular-distance matrix D against S's shape and return it as float64."""
    if D is None:
        raise MissingStatisticError(
            "the angular-distance method needs the matrix D of mean angular distances, which a bare "
            "similarity matrix S (.npy) does not contain; run the analysis on the model (or supply D) "
            "to use it",
            field="similarity",
        )
    try:
        d = np.asarray(D, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(
            f"the angular-distance matrix D is not a numeric array: {exc}", field="similarity"
        ) from exc
    if d.shape != shape:
        raise InvalidRequestError(
            f"the angular-distance matrix D must have the shape of S, {shape}; got {d.shape}",
            field="similarity",
        )
    if not np.all(np.isfinite(d)):
        raise InvalidRequestError("the angular-distance matrix D contains NaN or infinite values", field="similarity")
    return d


def num_blocks(S: npt.ArrayLike) -> int:
    """Number of decoder blocks N described by S, after validating S.

    Args:
        S: the (N+1) x (N+1) similarity matrix. It must be square, finite, symmetric, within [-1, 1]
            (up to rounding) and describe at least N = 2 blocks.

    Returns:
        N = S.shape[0] - 1.

    Raises:
        InvalidRequestError: (field ``similarity``) when S is not a valid similarity matrix.
    """
    return _as_similarity(S).shape[0] - 1


def _options(options: SelectionOptions | None) -> SelectionOptions:
    return options if options is not None else SelectionOptions()


def protected_set(n_blocks: int, options: SelectionOptions | None = None) -> frozenset[int]:
    """The blocks that no method may prune.

    Args:
        n_blocks: N, the number of decoder blocks.
        options: ``options.protected_layers`` ``None`` gives the default {0, N-1}; an explicit tuple replaces
            it, negative entries counting from the end (-1 is N-1).

    Returns:
        The protected block indices, normalised to 0..N-1.

    Raises:
        InvalidRequestError: (field ``options.protected_layers``) for an entry outside -N..N-1 or not an int.
    """
    opts = _options(options)
    if opts.protected_layers is None:
        return frozenset({0, n_blocks - 1})
    result: set[int] = set()
    for p in opts.protected_layers:
        # bool is an int subclass, but True as a block index is surely a mistake in the request.
        if isinstance(p, bool) or not isinstance(p, int | np.integer):
            raise InvalidRequestError(
                f"protected layer {p!r} is not an integer block index", field="options.protected_layers"
            )
        idx = int(p)
        if not -n_blocks <= idx < n_blocks:
            raise InvalidRequestError(
                f"protected layer {idx} is out of range for a model with N = {n_blocks} blocks "
                f"(valid: 0..{n_blocks - 1}, or -{n_blocks}..-1 counting from the end)",
                field="options.protected_layers",
            )
        result.add(idx % n_blocks)
    return frozenset(result)


def eligible_blocks(n_blocks: int, options: SelectionOptions | None = None) -> list[int]:
    """The blocks a method may prune: all blocks that are not protected, ascending.

    Args:
        n_blocks: N, the number of decoder blocks.
        options: selection options (for the protected set).
    """
    protected = protected_set(n_blocks, options)
    return [b for b in range(n_blocks) if b not in protected]


def validate_budget(n_blocks: int, n: int, options: SelectionOptions | None = None) -> None:
    """Check that n blocks can be pruned at all, before any work starts.

    Args:
        n_blocks: N, the number of decoder blocks.
        n: the pruning budget (number of blocks to remove).
        options: selection options (for the protected set).

    Raises:
        BudgetError: (field ``target.num_layers``) when n < 1 or n exceeds the number of eligible blocks.
        InvalidRequestError: when the protected set itself is invalid.
    """
    protected = protected_set(n_blocks, options)
    eligible = n_blocks - len(protected)
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise BudgetError(f"the number of layers to prune must be an integer, got {n!r}", field="target.num_layers")
    if n < 1 or n > eligible:
        raise BudgetError(
            f"cannot prune {n} block(s): the model has N = {n_blocks} blocks, protected "
            f"{sorted(protected)}, so {eligible} are eligible; choose 1 <= num_layers <= {eligible}",
            field="target.num_layers",
        )


def _validate_k(k: int, n_blocks: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 2 <= k <= n_blocks - 2:
        raise InvalidRequestError(
            f"num_clusters must be an integer with 2 <= K <= N-2 = {n_blocks - 2} for a model with "
            f"N = {n_blocks} blocks; got {k!r}",
            field="options.num_clusters",
        )


# --------------------------------------------------------------------------------------------------
# LoRP analysis (§3-5)
# --------------------------------------------------------------------------------------------------


def _mean_upper(m: Matrix) -> float:
    """Mean of m[i, j] for i < j (m square, at least 2 x 2)."""
    iu = np.triu_indices(m.shape[0], k=1)
    return float(np.mean(m[iu]))


def representation_locality_score(S: npt.ArrayLike) -> float | None:
    """Representation Locality Score over the N x N block-input part of S (docs/algorithm.md §3).

    Args:
        S: the (N+1) x (N+1) similarity matrix.

    Returns:
        -log2(mean S[i, j] for i < j < N), or ``None`` when that mean is <= 0 (RLS undefined).
    """
    m = _as_similarity(S)
    n_blocks = m.shape[0] - 1
    mean = _mean_upper(m[:n_blocks, :n_blocks])
    if mean <= 0.0:
        return None
    return -math.log2(mean)


def granularity(rls: float | None) -> int:
    """LoRP's number of clusters K from the RLS (docs/algorithm.md §4).

    Args:
        rls: the Representation Locality Score; ``None`` (undefined) counts as localized.

    Returns:
        2 when RLS >= 1.0 or undefined, 3 when 0.7 <= RLS < 1.0, 4 when RLS < 0.7.
    """
    if rls is None or rls >= 1.0:
        return 2
    if rls >= 0.7:
        return 3
    return 4


def _relabel_by_depth(labels: Sequence[int]) -> list[int]:
    """Renumber labels so that clusters are numbered by the depth of their first member."""
    mapping: dict[int, int] = {}
    for lab in labels:
        if lab not in mapping:
            mapping[lab] = len(mapping)
    return [mapping[lab] for lab in labels]


def cluster_blocks(S: npt.ArrayLike, k: int, seed: int = 0) -> list[int]:
    """Cluster the N blocks into k representational phases (docs/algorithm.md §5).

    Spectral clustering with scikit-learn on the affinity A = (S_NxN + 1) / 2 (diagonal 1), exactly as
    the reference does, then renumbered by the depth of each cluster's first member.

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        k: number of clusters, 2 <= k <= N.
        seed: ``random_state`` of the spectral clustering.

    Returns:
        The cluster of every block (length N); cluster 0 holds block 0.
    """
    m = _as_similarity(S)
    n_blocks = m.shape[0] - 1
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 2 <= k <= n_blocks:
        raise InvalidRequestError(
            f"cannot cluster N = {n_blocks} blocks into K = {k!r} clusters (need 2 <= K <= N)",
            field="options.num_clusters",
        )
    if k == n_blocks:
        # The only partition into N non-empty clusters is all singletons; sklearn would reach it only
        # through a dense-solver fallback and a warning.
        return list(range(n_blocks))
    # Heavy imports, only needed here; threadpoolctl ships with scikit-learn.
    from sklearn.cluster import SpectralClustering
    from threadpoolctl import threadpool_limits

    affinity = (m[:n_blocks, :n_blocks] + 1.0) / 2.0
    np.fill_diagonal(affinity, 1.0)
    # With a few dozen points, waking the OpenMP/BLAS thread pools costs ~10x the work itself (k-means
    # runs 10 inits); one thread gives the same labels (the data fit in one k-means chunk) much faster.
    with threadpool_limits(limits=1):
        labels = SpectralClustering(
            n_clusters=int(k),
            affinity="precomputed",
            assign_labels="kmeans",
            random_state=seed,
        ).fit_predict(affinity)
    return _relabel_by_depth([int(x) for x in labels])


def block_redundancy(S: npt.ArrayLike, clusters: Sequence[int]) -> list[float]:
    """r(l) = mean S[l, m] over the cluster mates m != l of every block l (docs/algorithm.md §6).

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        clusters: the cluster of every block (length N).

    Returns:
        r(l) per block, ``-inf`` for a block alone in its cluster.
    """
    m = _as_similarity(S)
    labels = list(clusters)
    result: list[float] = []
    for block, c in enumerate(labels):
        mates = [j for j, cj in enumerate(labels) if cj == c and j != block]
        result.append(float(np.mean(m[block, mates])) if mates else float("-inf"))
    return result


def _structure_for_k(m: Matrix, rls: float | None, k: int, seed: int) -> Structure:
    clusters = cluster_blocks(m, k, seed)
    return Structure(rls=rls, k=k, clusters=clusters, redundancy=block_redundancy(m, clusters))


def analyze_structure(S: npt.ArrayLike, options: SelectionOptions | None = None) -> Structure:
    """LoRP's structure of S: RLS, K, clusters and per-block redundancy.

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        options: ``num_clusters`` overrides K (2 <= K <= N-2); ``seed`` seeds the clustering.

    Returns:
        The :class:`Structure`. Without an override K comes from the RLS table; on models so shallow
        that the table's K exceeds N it is clamped to N (every block its own cluster).

    Raises:
        InvalidRequestError: for an invalid S or an out-of-range ``num_clusters``.
    """
    opts = _options(options)
    m = _as_similarity(S)
    n_blocks = m.shape[0] - 1
    rls = representation_locality_score(m)
    if opts.num_clusters is not None:
        _validate_k(opts.num_clusters, n_blocks)
        k = int(opts.num_clusters)
    else:
        # The spec bounds only a caller's K; the table's K is clamped so that N = 2 or 3 still works.
        k = min(granularity(rls), n_blocks)
    return _structure_for_k(m, rls, k, opts.cluster_seed)


# --------------------------------------------------------------------------------------------------
# LoRP allocation (§6)
# --------------------------------------------------------------------------------------------------


def allocate_budget(
    S: npt.ArrayLike, clusters: Sequence[int], protected: frozenset[int] | set[int], n: int
) -> list[int]:
    """LoRP's two-stage allocation of the budget n over the clusters (docs/algorithm.md §6).

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        clusters: the cluster of every block (length N), numbered 0..K-1 by depth of first member.
        protected: blocks that may not be pruned.
        n: number of blocks to prune; at most the number of non-protected blocks.

    Returns:
        The pruned blocks, sorted ascending.
    """
    m = _as_similarity(S)
    labels = list(clusters)
    if n > len(labels) - len(protected & set(range(len(labels)))):
        raise BudgetError(f"cannot prune {n} blocks: not enough eligible blocks", field="target.num_layers")
    redundancy = block_redundancy(m, labels)
    n_clusters = max(labels) + 1 if labels else 0
    members = [[b for b, c in enumerate(labels) if c == cl] for cl in range(n_clusters)]
    # Ranked once and never re-ranked; sorted() is stable, so equal r keeps depth order.
    candidates = [sorted((b for b in group if b not in protected), key=lambda b: -redundancy[b]) for group in members]
    next_idx = [0] * n_clusters
    chosen: list[int] = []

    for cl in range(n_clusters):
        if len(chosen) >= n:
            break
        if candidates[cl]:
            chosen.append(candidates[cl][0])
            next_idx[cl] = 1

    pruned = set(chosen)
    while len(chosen) < n:
        best_cl = -1
        best_rho = float("-inf")
        for cl in range(n_clusters):
            if next_idx[cl] >= len(candidates[cl]):
                continue
            remaining = [b for b in members[cl] if b not in pruned]
            rho = _mean_upper(m[np.ix_(remaining, remaining)]) if len(remaining) >= 2 else float("-inf")
            # Strict comparison: ties (including all -inf) stay with the lowest cluster number.
            if best_cl < 0 or rho > best_rho:
                best_cl, best_rho = cl, rho
        block = candidates[best_cl][next_idx[best_cl]]
        next_idx[best_cl] += 1
        chosen.append(block)
        pruned.add(block)
    return sorted(chosen)


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def _prepare(
    S: npt.ArrayLike, n: int, options: SelectionOptions | None
) -> tuple[Matrix, int, SelectionOptions, frozenset[int]]:
    m = _as_similarity(S)
    n_blocks = m.shape[0] - 1
    opts = _options(options)
    if opts.num_clusters is not None:
        _validate_k(opts.num_clusters, n_blocks)
    validate_budget(n_blocks, n, opts)
    return m, n_blocks, opts, protected_set(n_blocks, opts)


def _contiguous_starts(n_blocks: int, n: int, protected: frozenset[int]) -> list[int]:
    """Starts s of the runs [s, s+n) that contain no protected block."""
    return [s for s in range(n_blocks - n + 1) if not any(b in protected for b in range(s, s + n))]


def _no_run_error(n_blocks: int, n: int, protected: frozenset[int]) -> BudgetError:
    return BudgetError(
        f"no contiguous run of {n} block(s) avoids the protected blocks {sorted(protected)} in a model "
        f"with N = {n_blocks} blocks; lower num_layers or change protected_layers",
        field="target.num_layers",
    )


def _lorp_other_k(m: Matrix, D: Matrix | None, n: int, opts: SelectionOptions, own: Selection) -> dict[str, Selection]:
    """auto's further LoRP candidates: the plan at each K of :data:`AUTO_K_VALUES` in 2..N-2."""
    base = own.structure
    out: dict[str, Selection] = {}
    for k in AUTO_K_VALUES:
        if 2 <= k <= m.shape[0] - 3:
            structure = base if k == base.k else _structure_for_k(m, base.rls, k, opts.cluster_seed)
            out[f"lorp_k{k}"] = select_lorp(m, D, n, opts, structure=structure)
    return out


@register(
    "lorp",
    label="LoRP: cluster the blocks into phases by similarity and spread the cut over them",
    color="#d62728",
    marker="o",
    variants=_lorp_other_k,
)
def select_lorp(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """LoRP: cluster the blocks into phases and allocate n over them (docs/algorithm.md §3-6).

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        D: unused (accepted for a uniform signature).
        n: number of blocks to prune.
        options: K override, protected set and clustering seed.
        structure: a precomputed :func:`analyze_structure` result for the same S and options.
    """
    m, _, opts, protected = _prepare(S, n, options)
    st = structure if structure is not None else analyze_structure(m, opts)
    pruned = allocate_budget(m, st.clusters, protected, n)
    return Selection("lorp", pruned, st, {"redundancy": list(st.redundancy)})


@register(
    "shortgpt",
    label="ShortGPT: the blocks of lowest Block Influence, 1 - S[l, l+1]",
    color="#1f77b4",
    marker="s",
)
def select_shortgpt(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """ShortGPT: prune the n eligible blocks of lowest Block Influence BI(l) = 1 - S[l, l+1].

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        D: unused.
        n: number of blocks to prune.
        options: protected set (and the structure's K/seed).
        structure: a precomputed structure to report; computed when absent.

    Ties in BI go to the lower block index.
    """
    m, n_blocks, opts, protected = _prepare(S, n, options)
    bi = [1.0 - float(m[b, b + 1]) for b in range(n_blocks)]
    ranked = sorted((b for b in range(n_blocks) if b not in protected), key=lambda b: (bi[b], b))
    st = structure if structure is not None else analyze_structure(m, opts)
    return Selection("shortgpt", sorted(ranked[:n]), st, {"block_influence": bi})


def _streamline_runner_ups(
    m: Matrix, D: Matrix | None, n: int, opts: SelectionOptions, own: Selection
) -> dict[str, Selection]:
    """auto's further contiguous candidates: the eligible runs ranked 2 .. :data:`RUNNER_UP_RUNS`."""
    n_blocks = m.shape[0] - 1
    run_sim = own.scores["run_similarity"]
    ranked = _ranked_runs(run_sim, n_blocks, n, protected_set(n_blocks, opts))
    return {
        f"streamline_{rank}": Selection("streamline", list(range(start, start + n)), own.structure, own.scores)
        for rank, start in enumerate(ranked[1:RUNNER_UP_RUNS], 2)
    }


@register(
    "streamline",
    label="LLM-Streamline: the contiguous run whose input and output are most similar, S[s, s+n]",
    color="#2ca02c",
    marker="^",
    variants=_streamline_runner_ups,
)
def select_streamline(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """LLM-Streamline layer selection: the run [s, s+n) of eligible blocks with the largest S[s, s+n].

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        D: unused.
        n: number of blocks to prune (the run length).
        options: protected set (and the structure's K/seed).
        structure: a precomputed structure to report; computed when absent.

    The score ``run_similarity`` lists S[s, s+n] for every start s = 0..N-n, including starts whose run
    touches a protected block (those were not eligible). Ties go to the smallest s.

    Raises:
        BudgetError: when the protected blocks break every run of length n.
    """
    m, n_blocks, opts, protected = _prepare(S, n, options)
    run_sim = [float(m[s, s + n]) for s in range(n_blocks - n + 1)]
    best = _ranked_runs(run_sim, n_blocks, n, protected)[0]
    st = structure if structure is not None else analyze_structure(m, opts)
    return Selection("streamline", list(range(best, best + n)), st, {"run_similarity": run_sim})


def _ranked_runs(run_sim: list[float], n_blocks: int, n: int, protected: frozenset[int]) -> list[int]:
    """Starts of the eligible runs of length n, largest S[s, s+n] first (ties: smallest s)."""
    starts = _contiguous_starts(n_blocks, n, protected)
    if not starts:
        raise _no_run_error(n_blocks, n, protected)
    return sorted(starts, key=lambda s: (-run_sim[s], s))


@register(
    "angular",
    label="angular distance (Gromov et al.): the contiguous run of smallest D[s, s+n]",
    color="#9467bd",
    marker="v",
    needs_distance=True,
)
def select_angular(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """Angular distance (Gromov et al.): the run [s, s+n) of eligible blocks with the smallest D[s, s+n].

    Args:
        S: the (N+1) x (N+1) similarity matrix (validated, and used for the reported structure).
        D: the (N+1) x (N+1) mean angular-distance matrix; required.
        n: number of blocks to prune (the run length).
        options: protected set (and the structure's K/seed).
        structure: a precomputed structure to report; computed when absent.

    The score ``run_angular_distance`` lists D[s, s+n] for every start s = 0..N-n, including starts
    whose run touches a protected block. Ties go to the smallest s.

    Raises:
        MissingStatisticError: when D is absent (a bare S has no angular distances).
        BudgetError: when the protected blocks break every run of length n.
    """
    m, n_blocks, opts, protected = _prepare(S, n, options)
    d = _as_distance(D, m.shape)
    run_dist = [float(d[s, s + n]) for s in range(n_blocks - n + 1)]
    starts = _contiguous_starts(n_blocks, n, protected)
    if not starts:
        raise _no_run_error(n_blocks, n, protected)
    best = min(starts, key=lambda s: (run_dist[s], s))
    st = structure if structure is not None else analyze_structure(m, opts)
    return Selection("angular", list(range(best, best + n)), st, {"run_angular_distance": run_dist})


@register(
    "reverse",
    label="reverse order: the deepest blocks that are not protected",
    color="#8c564b",
    marker="x",
    curve=False,
)
def select_reverse(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
    *,
    structure: Structure | None = None,
) -> Selection:
    """Reverse order: prune the n deepest blocks that are not protected.

    Args:
        S: the (N+1) x (N+1) similarity matrix (validated, and used for the reported structure).
        D: unused.
        n: number of blocks to prune.
        options: protected set (and the structure's K/seed).
        structure: a precomputed structure to report; computed when absent.
    """
    m, n_blocks, opts, protected = _prepare(S, n, options)
    eligible = [b for b in range(n_blocks) if b not in protected]
    st = structure if structure is not None else analyze_structure(m, opts)
    return Selection("reverse", eligible[-n:], st, {})


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def select(
    method: str,
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
) -> Selection:
    """Run one selection method.

    Args:
        method: a name from :func:`method_names` (``auto`` is not one: it needs the model).
        S: the (N+1) x (N+1) similarity matrix.
        D: the (N+1) x (N+1) angular-distance matrix, or ``None`` when only S is available.
        n: number of blocks to prune.
        options: K override, protected set and seed.

    Returns:
        The method's :class:`Selection`.

    Raises:
        InvalidRequestError: (field ``method``) for ``auto`` or an unknown method; other fields for
            invalid S, options or budget (:class:`BudgetError`), or a missing D
            (:class:`MissingStatisticError`).
    """
    info = REGISTRY.get(method)
    if info is not None and info.plan is None:
        raise InvalidRequestError(
            f"method {method!r} scores candidate plans by perplexity and so needs the model, not just "
            f"the similarity matrix; use `lorp prune` with method {method}, or pick one of "
            f"{', '.join(method_names())}",
            field="method",
        )
    fn = METHODS.get(method)
    if fn is None:
        raise InvalidRequestError(
            f"unknown selection method {method!r}; known methods: {', '.join(method_names())} "
            f"(and {', '.join(repr(m) for m in scored_methods())}, which need the model)",
            field="method",
        )
    return fn(S, D, n, options)


def candidate_plans(
    S: npt.ArrayLike,
    D: npt.ArrayLike | None,
    n: int,
    options: SelectionOptions | None = None,
) -> dict[str, Selection]:
    """Every plan that method ``auto`` validates, keyed by candidate name.

    Each registered method with ``validated`` set gives its plan under its own name, then its
    ``variants``, in registration order: today ``lorp`` (K from the RLS or the override), ``lorp_k2``
    .. ``lorp_k6`` (those K in 2..N-2), ``shortgpt``, ``streamline``, ``streamline_2`` and
    ``streamline_3`` (the eligible runs with the second and third largest S[s, s+n], where they
    exist), ``angular`` (only when D is given) and ``reverse``; each Selection's ``method`` is its
    key. A contiguous-run method with no run avoiding the protected blocks is left out.

    Args:
        S: the (N+1) x (N+1) similarity matrix.
        D: the (N+1) x (N+1) angular-distance matrix, or ``None``.
        n: number of blocks to prune.
        options: K override, protected set and seed.

    Raises:
        BudgetError: when n fails :func:`validate_budget`.
        InvalidRequestError: for an invalid S, D or options.
    """
    m, _, opts, _ = _prepare(S, n, options)
    d = _as_distance(D, m.shape) if D is not None else None
    base = analyze_structure(m, opts)
    plans: dict[str, Selection] = {}
    for name, info in REGISTRY.items():
        if not info.validated or info.plan is None or (info.needs_distance and d is None):
            continue
        try:
            own = info.plan(m, d, n, opts, structure=base)
        except BudgetError:
            # validate_budget passed above, so this is a run method whose every run hits a protected
            # block: that candidate simply does not exist for this budget.
            continue
        found = {name: own, **(info.variants(m, d, n, opts, own) if info.variants is not None else {})}
        plans.update({key: Selection(key, sel.pruned_layers, sel.structure, sel.scores) for key, sel in found.items()})
    return plans
