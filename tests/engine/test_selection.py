"""Selection rules of docs/algorithm.md §3-7, pinned on hand-built matrices.

Most matrices use dyadic values (multiples of 1/8) so that the means the rules compare are exact in
floating point and intended ties really are ties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from sklearn.cluster import SpectralClustering

from lorp.errors import BudgetError, InvalidRequestError, MissingStatisticError
from lorp.selection import (
    METHODS,
    Selection,
    SelectionOptions,
    allocate_budget,
    analyze_structure,
    candidate_plans,
    cluster_blocks,
    eligible_blocks,
    granularity,
    method_names,
    num_blocks,
    protected_set,
    representation_locality_score,
    select,
    validate_budget,
)

# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def sym(n_blocks: int, entries: dict[tuple[int, int], float], default: float = 0.5) -> np.ndarray:
    """(N+1) x (N+1) symmetric matrix, diagonal 1, ``default`` off the diagonal, ``entries`` set."""
    s = np.full((n_blocks + 1, n_blocks + 1), default)
    for (i, j), v in entries.items():
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 1.0)
    return s


def phases(
    groups: list[list[int]],
    within: float = 0.875,
    between: float = -0.25,
    entries: dict[tuple[int, int], float] | None = None,
) -> np.ndarray:
    """Block-structured S: ``within`` inside a group, ``between`` across groups, then ``entries``.

    Row/column N (the last block's output) copies block N-1, as a real S roughly would.
    """
    n_blocks = sum(len(g) for g in groups)
    label = {b: c for c, g in enumerate(groups) for b in g}
    s = np.full((n_blocks + 1, n_blocks + 1), between)
    for i in range(n_blocks):
        for j in range(n_blocks):
            if label[i] == label[j]:
                s[i, j] = within
    s[n_blocks, :] = s[n_blocks - 1, :]
    s[:, n_blocks] = s[:, n_blocks - 1]
    s[n_blocks, n_blocks - 1] = s[n_blocks - 1, n_blocks] = within
    for (i, j), v in (entries or {}).items():
        s[i, j] = s[j, i] = v
    np.fill_diagonal(s, 1.0)
    return s


def random_statistics(
    rng: np.random.Generator, n_blocks: int, tokens: int = 24, dim: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """S and D from a random walk of token states through depth, as the real pass computes them."""
    x = rng.normal(size=(tokens, dim))
    drift = rng.uniform(0.2, 0.8)
    states = [x]
    for _ in range(n_blocks):
        x = x + drift * rng.normal(size=(tokens, dim))
        states.append(x)
    u = np.stack(states)  # [N+1, T, d]
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    dots = np.clip(np.einsum("itd,jtd->ijt", u, u), -1.0, 1.0)
    s = dots.mean(axis=-1)
    d = (np.arccos(dots) / np.pi).mean(axis=-1)
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    np.fill_diagonal(d, 0.0)
    return s, (d + d.T) / 2


def raw_spectral_labels(s: np.ndarray, k: int, seed: int = 0) -> list[int]:
    n_blocks = s.shape[0] - 1
    a = (s[:n_blocks, :n_blocks] + 1) / 2
    np.fill_diagonal(a, 1.0)
    sc = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="kmeans", random_state=seed)
    return [int(x) for x in sc.fit_predict(a)]


def lorp(s: np.ndarray, n: int, k: int, protected: tuple[int, ...] | None = None) -> list[int]:
    return select("lorp", s, None, n, SelectionOptions(num_clusters=k, protected_layers=protected)).pruned_layers


# ------------------------------------------------------------------------------------------------
# Validation of S
# ------------------------------------------------------------------------------------------------


def test_num_blocks_is_size_minus_one() -> None:
    assert num_blocks(np.eye(3)) == 2
    assert num_blocks(sym(7, {})) == 7


@pytest.mark.parametrize(
    "bad",
    [
        np.eye(2),  # N = 1
        np.ones((3, 4)),  # not square
        np.ones(9),  # not 2-D
        np.where(np.eye(4) == 1, 1.0, np.nan),  # NaN
        sym(3, {(0, 1): 1.5}),  # not a cosine similarity
        np.triu(np.full((4, 4), 0.5)) + np.eye(4) * 0.5,  # not symmetric
    ],
)
def test_invalid_similarity_is_rejected(bad: np.ndarray) -> None:
    with pytest.raises(InvalidRequestError) as err:
        num_blocks(bad)
    assert err.value.field == "similarity"


# ------------------------------------------------------------------------------------------------
# §3 RLS and §4 K
# ------------------------------------------------------------------------------------------------


def test_rls_is_minus_log2_of_the_upper_mean_of_the_block_input_part() -> None:
    # Pairs (0,1), (0,2), (1,2): mean (0.5 + 0.25 + 0.75) / 3 = 0.5 -> RLS 1. Row 3 must not count.
    s = sym(3, {(0, 1): 0.5, (0, 2): 0.25, (1, 2): 0.75, (0, 3): -0.9, (1, 3): -0.9, (2, 3): 0.99})
    assert representation_locality_score(s) == 1.0
    s2 = sym(3, {(0, 1): 0.5, (0, 2): 0.25, (1, 2): 0.125})
    assert representation_locality_score(s2) == pytest.approx(-math.log2(0.875 / 3))


@pytest.mark.parametrize("values", [(0.5, -0.5, 0.0), (-0.25, -0.5, 0.125)])
def test_rls_is_none_when_mean_is_not_positive(values: tuple[float, float, float]) -> None:
    s = sym(3, {(0, 1): values[0], (0, 2): values[1], (1, 2): values[2]})
    assert representation_locality_score(s) is None


@pytest.mark.parametrize(
    ("rls", "k"),
    [
        (None, 2),
        (5.0, 2),
        (1.149, 2),
        (1.0, 2),
        (math.nextafter(1.0, 0.0), 3),
        (0.85, 3),
        (0.7, 3),
        (math.nextafter(0.7, 0.0), 4),
        (0.685, 4),
        (0.0, 4),
        (-0.5, 4),
    ],
)
def test_granularity_table(rls: float | None, k: int) -> None:
    assert granularity(rls) == k


@pytest.mark.parametrize(("mean", "k"), [(0.45, 2), (0.55, 3), (0.65, 4)])
def test_analyze_structure_takes_k_from_rls(mean: float, k: int) -> None:
    # S[i, j] = a - 0.03 |i - j| over N = 6: the 15 pairs have total distance 35, so the mean is
    # a - 0.07; distinct rows keep the spectral clustering non-degenerate.
    a = mean + 0.07
    s = sym(6, {(i, j): a - 0.03 * abs(i - j) for i in range(7) for j in range(7) if i != j})
    st = analyze_structure(s)
    assert st.rls == pytest.approx(-math.log2(mean))
    assert st.k == k
    assert len(st.clusters) == 6 and len(set(st.clusters)) == k


def test_analyze_structure_undefined_rls_means_two_clusters() -> None:
    s = phases([[0, 1, 2], [3, 4, 5]], within=0.25, between=-0.5)
    st = analyze_structure(s)
    assert st.rls is None
    assert st.k == 2
    assert st.clusters == [0, 0, 0, 1, 1, 1]


def test_table_k_is_clamped_to_the_number_of_blocks() -> None:
    # RLS < 0.7 asks for K = 4, but N = 3 blocks can form at most 3 clusters.
    s = sym(3, {}, default=0.75)
    st = analyze_structure(s)
    assert st.k == 3
    assert st.clusters == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 0, -3])
def test_num_clusters_below_two_is_refused_by_the_spec(k: int) -> None:
    with pytest.raises(ValidationError) as err:
        SelectionOptions(num_clusters=k)
    assert err.value.errors()[0]["loc"] == ("num_clusters",)


@pytest.mark.parametrize(("k", "ok"), [(2, True), (4, True), (5, False), (30, False)])
def test_num_clusters_override_bounds(k: int, ok: bool) -> None:
    s = phases([[0, 1, 2], [3, 4, 5]])  # N = 6: 2 <= K <= 4
    opts = SelectionOptions(num_clusters=k)
    if ok:
        assert analyze_structure(s, opts).k == k
        assert select("reverse", s, None, 1, opts).structure.k == k
    else:
        with pytest.raises(InvalidRequestError) as err:
            analyze_structure(s, opts)
        assert err.value.field == "options.num_clusters"
        with pytest.raises(InvalidRequestError) as err:
            select("lorp", s, None, 1, opts)
        assert err.value.field == "options.num_clusters"


# ------------------------------------------------------------------------------------------------
# §5 clustering
# ------------------------------------------------------------------------------------------------


def test_clusters_are_renumbered_by_depth_of_first_member() -> None:
    s = phases([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    raw = raw_spectral_labels(s, 3)
    # Precondition: scikit-learn's own numbering is not already by depth, so relabelling is tested.
    assert raw[0] != 0 or raw[3] != 1
    assert cluster_blocks(s, 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_relabelling_handles_non_contiguous_clusters() -> None:
    s = phases([[0, 4, 8], [1, 3, 6], [2, 5, 7]])
    clusters = cluster_blocks(s, 3)
    assert clusters == [0, 1, 2, 1, 0, 2, 1, 2, 0]
    first_member = [clusters.index(c) for c in range(3)]
    assert first_member == sorted(first_member)


def test_clustering_is_deterministic_for_a_seed() -> None:
    s, _ = random_statistics(np.random.default_rng(7), 14)
    for seed in (0, 3):
        first = cluster_blocks(s, 4, seed=seed)
        assert cluster_blocks(s, 4, seed=seed) == first
        assert analyze_structure(s, SelectionOptions(num_clusters=4, cluster_seed=seed)).clusters == first
        assert first[0] == 0


def test_redundancy_is_mean_similarity_to_cluster_mates() -> None:
    s = phases([[0, 1], [2, 3, 4], [5]], entries={(2, 3): 0.5, (2, 4): 0.25, (3, 4): 0.75})
    st = analyze_structure(s, SelectionOptions(num_clusters=3))
    assert st.clusters == [0, 0, 1, 1, 1, 2]
    assert st.redundancy == [0.875, 0.875, 0.375, 0.625, 0.5, float("-inf")]


# ------------------------------------------------------------------------------------------------
# §6 allocation
# ------------------------------------------------------------------------------------------------

# Three phases of N = 9, protected {0, 8}. Candidate lists by r (computed by hand):
#   c0 {0,1,2}: r(1) = (0.875+0.75)/2 = 0.8125, r(2) = (0.625+0.75)/2 = 0.6875        -> [1, 2]
#   c1 {3,4,5}: r(3) = 0.6875, r(4) = 0.75, r(5) = 0.8125                              -> [5, 4, 3]
#   c2 {6,7,8}: r(6) = 0.6875, r(7) = 0.8125 (8 protected)                            -> [7, 6]
THREE_PHASES = {
    (0, 1): 0.875,
    (0, 2): 0.625,
    (1, 2): 0.75,
    (3, 4): 0.625,
    (3, 5): 0.75,
    (4, 5): 0.875,
    (6, 7): 0.75,
    (6, 8): 0.625,
    (7, 8): 0.875,
}


def three_phases(**overrides: float) -> np.ndarray:
    entries = dict(THREE_PHASES)
    for key, v in overrides.items():
        i, j = (int(x) for x in key.lstrip("s").split("_"))
        entries[(i, j)] = v
    return phases([[0, 1, 2], [3, 4, 5], [6, 7, 8]], within=0.75, entries=entries)


@pytest.mark.parametrize(("n", "expected"), [(1, [1]), (2, [1, 5]), (3, [1, 5, 7])])
def test_stage1_takes_each_clusters_top_candidate_in_cluster_order(n: int, expected: list[int]) -> None:
    s = three_phases()
    assert analyze_structure(s, SelectionOptions(num_clusters=3)).clusters == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert lorp(s, n, 3) == expected


def test_stage2_tie_in_rho_goes_to_lowest_cluster() -> None:
    # After stage 1 ({1, 5, 7}) the residual pairs are (0,2), (3,4), (6,8): rho = 0.625 in all three.
    s = three_phases()
    assert lorp(s, 4, 3) == [1, 2, 5, 7]


def test_stage2_tie_between_later_clusters() -> None:
    # rho(c0) = S[0,2] = 0.5 now, rho(c1) = rho(c2) = 0.625: c1 wins the tie and gives 4 (not c2's 6).
    s = three_phases(s0_2=0.5)
    assert lorp(s, 4, 3) == [1, 4, 5, 7]


def test_stage2_follows_residual_redundancy_not_block_redundancy() -> None:
    # c0 = {0,1,2,3}: candidates 1,2,3 are alike (0.875) but far from protected 0 (0.25), so r = 2/3
    # each -> [1, 2, 3]. c1 = {4,5,6,7}: 0.5 everywhere, r = 0.5 -> [4, 5, 6] (7 protected).
    # After stage 1 ({1, 4}): rho(c0) = (0.25 + 0.25 + 0.875)/3 ~ 0.458 < rho(c1) = 0.5, so stage 2
    # takes 5 and then 6 although block 2 has the higher r; c1 is then exhausted and 2 follows.
    entries = {(0, 1): 0.25, (0, 2): 0.25, (0, 3): 0.25}
    s = phases([[0, 1, 2, 3], [4, 5, 6, 7]], within=0.5, between=-0.5, entries=entries)
    for pairs in [(1, 2), (1, 3), (2, 3)]:
        s[pairs] = s[pairs[::-1]] = 0.875
    assert analyze_structure(s, SelectionOptions(num_clusters=2)).clusters == [0] * 4 + [1] * 4
    assert [lorp(s, n, 2) for n in range(1, 7)] == [
        [1],
        [1, 4],
        [1, 4, 5],
        [1, 4, 5, 6],
        [1, 2, 4, 5, 6],
        [1, 2, 3, 4, 5, 6],
    ]


def test_stage2_all_minus_inf_goes_to_lowest_cluster_and_r_ties_keep_depth_order() -> None:
    # Pairs {0,1}, {2,3}, {4,5}, nothing protected: every r ties inside its pair, so stage 1 takes the
    # shallower block of each; afterwards every cluster has one member left (rho = -inf) -> c0.
    s = phases([[0, 1], [2, 3], [4, 5]])
    assert lorp(s, 3, 3, protected=()) == [0, 2, 4]
    assert lorp(s, 4, 3, protected=()) == [0, 1, 2, 4]
    assert lorp(s, 5, 3, protected=()) == [0, 1, 2, 3, 4]


def test_allocate_budget_on_given_clusters() -> None:
    # Independent of the clustering: clusters {0,2,4} and {1,3,5} (non-contiguous), protected {0}.
    s = sym(5, {(0, 2): 0.25, (0, 4): 0.5, (2, 4): 0.75, (1, 3): 0.125, (1, 5): 0.5, (3, 5): 0.625})
    clusters = [0, 1, 0, 1, 0, 1]
    # r: 2 -> 0.5, 4 -> 0.625 => c0 [4, 2]; 1 -> 0.3125, 3 -> 0.375, 5 -> 0.5625 => c1 [5, 3, 1].
    # Stage 2 at n=3: rho(c0) over {0,2} = 0.25, rho(c1) over {1,3} = 0.125 -> c0's 2.
    assert allocate_budget(s, clusters, frozenset({0}), 2) == [4, 5]
    assert allocate_budget(s, clusters, frozenset({0}), 3) == [2, 4, 5]
    assert allocate_budget(s, clusters, frozenset({0}), 4) == [2, 3, 4, 5]


def test_lorp_reports_redundancy_scores() -> None:
    sel = select("lorp", three_phases(), None, 2, SelectionOptions(num_clusters=3))
    assert sel.method == "lorp"
    assert sel.scores == {"redundancy": sel.structure.redundancy}
    assert sel.structure.redundancy[1] == 0.8125


# ------------------------------------------------------------------------------------------------
# Protected set and budget
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("protected", "expected"),
    [(None, {0, 5}), ((), set()), ((1, 2), {1, 2}), ((-1,), {5}), ((-6, 3, -3), {0, 3})],
)
def test_protected_set(protected: tuple[int, ...] | None, expected: set[int]) -> None:
    opts = SelectionOptions(protected_layers=protected)
    assert protected_set(6, opts) == frozenset(expected)
    assert eligible_blocks(6, opts) == [b for b in range(6) if b not in expected]


@pytest.mark.parametrize("bad", [(6,), (-7,), (0, 100)])
def test_protected_out_of_range(bad: tuple[int, ...]) -> None:
    with pytest.raises(InvalidRequestError) as err:
        protected_set(6, SelectionOptions(protected_layers=bad))
    assert err.value.field == "options.protected_layers"
    with pytest.raises(InvalidRequestError) as err:
        select("reverse", sym(6, {}), None, 1, SelectionOptions(protected_layers=bad))
    assert err.value.field == "options.protected_layers"


@pytest.mark.parametrize("protected", [None, (), (1, 2), (-2,), (0, -1, 3)])
@pytest.mark.parametrize("method", ["lorp", "shortgpt", "reverse"])
def test_protected_blocks_are_never_pruned(method: str, protected: tuple[int, ...] | None) -> None:
    s, _ = random_statistics(np.random.default_rng(3), 10)
    opts = SelectionOptions(protected_layers=protected)
    prot = protected_set(10, opts)
    for n in range(1, 10 - len(prot) + 1):
        sel = select(method, s, None, n, opts)
        assert not set(sel.pruned_layers) & prot
        assert len(sel.pruned_layers) == n


@pytest.mark.parametrize("n", [0, -1, 5, 6])
def test_budget_errors(n: int) -> None:
    s = sym(6, {})
    with pytest.raises(BudgetError) as err:
        validate_budget(6, n, None)
    assert err.value.field == "target.num_layers"
    assert "N = 6" in err.value.message and "[0, 5]" in err.value.message and "4 are eligible" in err.value.message
    for method in method_names():
        with pytest.raises(BudgetError):
            select(method, s, np.zeros_like(s), n)
    with pytest.raises(BudgetError):
        candidate_plans(s, None, n)


def test_budget_counts_the_custom_protected_set() -> None:
    validate_budget(6, 6, SelectionOptions(protected_layers=()))
    validate_budget(6, 5, SelectionOptions(protected_layers=(2,)))
    with pytest.raises(BudgetError):
        validate_budget(6, 5, SelectionOptions(protected_layers=(2, 3)))


# ------------------------------------------------------------------------------------------------
# §7 baselines
# ------------------------------------------------------------------------------------------------

# N = 6. S[l, l+1]: 0.99 (protected 0), 0.9, 0.95, 0.95, 0.8, 0.97 (protected 5)
# => BI(1..4) = 0.1, 0.05, 0.05, 0.2.
SHORTGPT_S = sym(6, {(0, 1): 0.99, (1, 2): 0.9, (2, 3): 0.95, (3, 4): 0.95, (4, 5): 0.8, (5, 6): 0.97})


@pytest.mark.parametrize(("n", "expected"), [(1, [2]), (2, [2, 3]), (3, [1, 2, 3]), (4, [1, 2, 3, 4])])
def test_shortgpt_prunes_lowest_block_influence(n: int, expected: list[int]) -> None:
    sel = select("shortgpt", SHORTGPT_S, None, n)
    assert sel.pruned_layers == expected
    assert sel.scores["block_influence"] == pytest.approx([0.01, 0.1, 0.05, 0.05, 0.2, 0.03])


def test_shortgpt_without_protection_takes_block_zero() -> None:
    assert select("shortgpt", SHORTGPT_S, None, 2, SelectionOptions(protected_layers=())).pruned_layers == [0, 5]


# Runs of n = 2 over N = 6: S[s, s+2] = 0.99, 0.6, 0.8, 0.8, 0.95 for s = 0..4.
STREAMLINE_S = sym(6, {(0, 2): 0.99, (1, 3): 0.6, (2, 4): 0.8, (3, 5): 0.8, (4, 6): 0.95})


@pytest.mark.parametrize(
    ("protected", "expected"),
    [(None, [2, 3]), ((), [0, 1]), ((2,), [0, 1]), ((0,), [4, 5]), ((0, -2), [2, 3])],
)
def test_streamline_maximises_run_similarity(protected: tuple[int, ...] | None, expected: list[int]) -> None:
    sel = select("streamline", STREAMLINE_S, None, 2, SelectionOptions(protected_layers=protected))
    assert sel.pruned_layers == expected
    assert sel.scores["run_similarity"] == [0.99, 0.6, 0.8, 0.8, 0.95]


# D[s, s+2] = 0.01, 0.3, 0.2, 0.2, 0.05 for s = 0..4.
ANGULAR_D = sym(6, {(0, 2): 0.01, (1, 3): 0.3, (2, 4): 0.2, (3, 5): 0.2, (4, 6): 0.05}, default=0.4)
np.fill_diagonal(ANGULAR_D, 0.0)


@pytest.mark.parametrize(
    ("protected", "expected"),
    [(None, [2, 3]), ((), [0, 1]), ((-3,), [0, 1]), ((0,), [4, 5]), ((0, 4), [2, 3])],
)
def test_angular_minimises_run_distance(protected: tuple[int, ...] | None, expected: list[int]) -> None:
    sel = select("angular", STREAMLINE_S, ANGULAR_D, 2, SelectionOptions(protected_layers=protected))
    assert sel.pruned_layers == expected
    assert sel.scores["run_angular_distance"] == [0.01, 0.3, 0.2, 0.2, 0.05]


def test_angular_without_d_raises_missing_statistic() -> None:
    with pytest.raises(MissingStatisticError) as err:
        select("angular", STREAMLINE_S, None, 2)
    assert err.value.field == "similarity"
    assert "angular" in err.value.message and ".npy" in err.value.message


def test_angular_rejects_d_of_the_wrong_shape() -> None:
    with pytest.raises(InvalidRequestError):
        select("angular", STREAMLINE_S, np.zeros((3, 3)), 2)


@pytest.mark.parametrize(
    ("protected", "n", "expected"),
    [(None, 2, [3, 4]), (None, 4, [1, 2, 3, 4]), ((), 2, [4, 5]), ((-2,), 2, [3, 5]), ((5, 4), 3, [1, 2, 3])],
)
def test_reverse_cuts_deepest_unprotected(protected: tuple[int, ...] | None, n: int, expected: list[int]) -> None:
    sel = select("reverse", sym(6, {}), None, n, SelectionOptions(protected_layers=protected))
    assert sel.pruned_layers == expected


@pytest.mark.parametrize("method", ["streamline", "angular"])
def test_run_methods_without_a_valid_run_raise(method: str) -> None:
    opts = SelectionOptions(protected_layers=(0, 2, 4))
    with pytest.raises(BudgetError) as err:
        select(method, STREAMLINE_S, ANGULAR_D, 2, opts)
    assert err.value.field == "target.num_layers"


def test_baselines_report_the_structure() -> None:
    s = three_phases()
    opts = SelectionOptions(num_clusters=3)
    expected = analyze_structure(s, opts)
    for method in method_names():
        assert select(method, s, np.zeros_like(s), 2, opts).structure == expected


# ------------------------------------------------------------------------------------------------
# Dispatch and candidates
# ------------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert method_names() == ["angular", "lorp", "reverse", "shortgpt", "streamline"]
    assert set(METHODS) == set(method_names())
    assert "auto" not in METHODS


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as err:
        select("bogus", sym(6, {}), None, 1)
    assert err.value.field == "method"
    for name in method_names():
        assert name in err.value.message


def test_auto_is_not_a_pure_method() -> None:
    with pytest.raises(InvalidRequestError) as err:
        select("auto", sym(6, {}), None, 1)
    assert err.value.field == "method"
    assert "lorp prune" in err.value.message


def test_candidate_plans_keys_with_d() -> None:
    s, d = random_statistics(np.random.default_rng(11), 8)
    plans = candidate_plans(s, d, 3)
    assert list(plans) == [
        "lorp",
        *(f"lorp_k{k}" for k in range(2, 7)),
        "shortgpt",
        "streamline",
        "streamline_2",
        "streamline_3",
        "angular",
        "reverse",
    ]
    for key, sel in plans.items():
        assert sel.method == key
        assert len(sel.pruned_layers) == 3
    for k in range(2, 7):
        assert plans[f"lorp_k{k}"].structure.k == k
    assert plans["lorp"].structure == analyze_structure(s)
    assert plans["shortgpt"].pruned_layers == select("shortgpt", s, d, 3).pruned_layers


def test_candidate_plans_skip_k_beyond_n_minus_2_and_angular_without_d() -> None:
    s, _ = random_statistics(np.random.default_rng(12), 6)
    plans = candidate_plans(s, None, 2, SelectionOptions(num_clusters=3))
    assert list(plans) == [
        "lorp",
        "lorp_k2",
        "lorp_k3",
        "lorp_k4",
        "shortgpt",
        "streamline",
        "streamline_2",
        "streamline_3",
        "reverse",
    ]
    assert plans["lorp"].structure.k == 3
    assert plans["lorp"].pruned_layers == plans["lorp_k3"].pruned_layers


def test_candidate_plans_add_streamline_runners_up_in_similarity_order() -> None:
    s, d = random_statistics(np.random.default_rng(13), 10)
    n = 3
    plans = candidate_plans(s, d, n, SelectionOptions(protected_layers=(0, 9)))
    eligible = [a for a in range(1, 10 - n)]  # runs [a, a+3) clear of blocks 0 and 9
    ranked = sorted(eligible, key=lambda a: (-float(s[a, a + n]), a))
    assert [plans[key].pruned_layers for key in ("streamline", "streamline_2", "streamline_3")] == [
        list(range(a, a + n)) for a in ranked[:3]
    ]
    assert plans["streamline_2"].method == "streamline_2"
    assert float(s[ranked[1], ranked[1] + n]) >= float(s[ranked[2], ranked[2] + n])


def test_candidate_plans_have_only_the_runners_up_that_exist() -> None:
    s, d = random_statistics(np.random.default_rng(14), 6)
    # Blocks 0 and 5 protected: runs of 3 can start at 1 or 2 only.
    plans = candidate_plans(s, d, 3, SelectionOptions(protected_layers=(0, 5)))
    assert "streamline_2" in plans
    assert "streamline_3" not in plans
    assert {tuple(plans["streamline"].pruned_layers), tuple(plans["streamline_2"].pruned_layers)} == {
        (1, 2, 3),
        (2, 3, 4),
    }


def test_candidate_plans_leave_out_run_methods_without_a_run() -> None:
    plans = candidate_plans(STREAMLINE_S, ANGULAR_D, 2, SelectionOptions(protected_layers=(0, 2, 4)))
    assert list(plans) == ["lorp", "lorp_k2", "lorp_k3", "lorp_k4", "shortgpt", "reverse"]


# ------------------------------------------------------------------------------------------------
# Property: every method on random valid matrices
# ------------------------------------------------------------------------------------------------


def _check(sel: Selection, n: int, n_blocks: int, protected: frozenset[int]) -> None:
    assert len(sel.pruned_layers) == n
    assert sel.pruned_layers == sorted(set(sel.pruned_layers))
    assert all(isinstance(b, int) and 0 <= b < n_blocks for b in sel.pruned_layers)
    assert not set(sel.pruned_layers) & protected
    assert len(sel.structure.clusters) == n_blocks
    assert sel.structure.clusters[0] == 0


@pytest.mark.parametrize("seed", range(6))
def test_every_method_on_random_matrices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_blocks = int(rng.integers(4, 17))
    s, d = random_statistics(rng, n_blocks)
    protected_options: list[tuple[int, ...] | None] = [
        None,
        (),
        tuple(int(x) for x in rng.choice(n_blocks, size=2, replace=False)),
    ]
    for protected in protected_options:
        opts = SelectionOptions(protected_layers=protected, cluster_seed=seed)
        prot = protected_set(n_blocks, opts)
        n_eligible = n_blocks - len(prot)
        st = analyze_structure(s, opts)
        assert st.k == min(granularity(st.rls), n_blocks)
        for n in sorted({1, max(1, n_eligible // 2), n_eligible}):
            for method in method_names():
                try:
                    sel = METHODS[method](s, d, n, opts, structure=st)
                except BudgetError:
                    # Only a run method may fail, and only when no run avoids the protected blocks.
                    assert method in ("streamline", "angular")
                    assert all(set(range(a, a + n)) & prot for a in range(n_blocks - n + 1))
                    continue
                _check(sel, n, n_blocks, prot)
                assert sel == select(method, s, d, n, opts)
            for key, sel in candidate_plans(s, d, n, opts).items():
                assert sel.method == key
                _check(sel, n, n_blocks, prot)
