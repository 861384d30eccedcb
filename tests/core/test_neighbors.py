"""Neighbor tables against a brute-force float64 reference, lazy table against the full one."""

import pytest
import torch

from ngrpo_ray.core import neighbors
from ngrpo_ray.core.neighbors import METRICS, LazyNeighborTable, build_neighbor_table, valid_row_mask


def brute_force_table(E: torch.Tensor, k: int, metric: str, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Python-loop reference in float64: sort every row by (score desc, id asc)."""
    E = E.double()
    V = E.shape[0]
    valid = torch.ones(V, dtype=torch.bool) if valid is None else valid
    out = torch.arange(V).unsqueeze(1).repeat(1, k)
    for v in range(V):
        if not valid[v]:
            continue
        cands = []
        for u in range(V):
            if u == v or not valid[u]:
                continue
            a, b = E[v], E[u]
            if metric == "cosine":
                score = float(a @ b / (a.norm() * b.norm()))
            elif metric == "dot":
                score = float(a @ b)
            elif metric == "l2":
                score = -float((a - b).norm())
            else:
                score = -float((a - b).abs().sum())
            cands.append((-score, u))
        cands.sort()
        out[v, 1:] = torch.tensor([u for _, u in cands[: k - 1]], dtype=torch.long)
    return out


@pytest.mark.parametrize("metric", METRICS)
def test_full_table_matches_brute_force_random(metric):
    g = torch.Generator().manual_seed(1)
    E = torch.randn(60, 8, generator=g)
    expected = brute_force_table(E, 4, metric)
    got = build_neighbor_table(E, 4, metric=metric, chunk_rows=7)  # chunk not dividing V on purpose
    assert got.dtype == torch.int64 and got.shape == (60, 4)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("metric", METRICS)
def test_invalid_rows_excluded_and_ties_by_lower_id(metric):
    # Duplicated rows create exact ties (identical columns give bitwise identical scores).
    g = torch.Generator().manual_seed(2)
    E = torch.randn(40, 5, generator=g)
    E[10] = E[3]
    E[17] = E[3]
    E[25] = E[3]
    E[31] = E[8]
    valid = torch.ones(40, dtype=torch.bool)
    valid[[0, 17, 39]] = False
    expected = brute_force_table(E, 3, metric, valid)
    got = build_neighbor_table(E, 3, metric=metric, valid=valid, chunk_rows=6)
    assert torch.equal(got, expected)
    # Row 3 ties exactly with 10, 17 (invalid) and 25: the two lowest valid ids win, in id order.
    if metric != "dot":  # dot is not maximised by the row itself
        assert got[3].tolist() == [3, 10, 25]
    assert got[17].tolist() == [17, 17, 17]  # invalid anchor: itself repeated
    assert not torch.isin(got[valid][:, 1:], torch.tensor([0, 17, 39])).any()
    assert (got[:, 1:] != got[:, :1]).logical_or(~valid.unsqueeze(1)).all()


def test_tie_straddling_the_cut_keeps_lowest_ids():
    # Anchor 0 has four exact-tie neighbours (ids 1..4, identical rows) and k-1 = 2 slots.
    E = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    for metric in METRICS:
        got = build_neighbor_table(E, 3, metric=metric)
        assert got[0].tolist() == [0, 1, 2], metric
        assert got[3].tolist() == [3, 1, 2], metric


def test_hand_computed_cosine_rows():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    # cos(0,1)=0, cos(0,2)=0.707, cos(0,3)=-0.98 -> row 0 = [0, 2, 1]
    # cos(3,0)=-0.98, cos(3,1)=0.196, cos(3,2)=-0.555 -> row 3 = [3, 1, 2]
    got = build_neighbor_table(E, 3)
    assert got.tolist() == [[0, 2, 1], [1, 2, 3], [2, 0, 1], [3, 1, 2]]
    # L2 row 3: |3-0|=2.01, |3-1|=1.28, |3-2|=2.15 -> [3, 1, 0]
    assert build_neighbor_table(E, 3, metric="l2")[3].tolist() == [3, 1, 0]


def test_errors_name_the_problem():
    E = torch.randn(5, 3)
    with pytest.raises(ValueError, match="metric"):
        build_neighbor_table(E, 2, metric="manhattan")
    with pytest.raises(ValueError, match="valid rows"):
        build_neighbor_table(E, 6)


@pytest.mark.parametrize("metric", METRICS)
def test_lazy_table_equals_full_table(metric):
    g = torch.Generator().manual_seed(3)
    E = torch.randn(50, 6, generator=g)
    valid = torch.ones(50, dtype=torch.bool)
    valid[[5, 6]] = False
    full = build_neighbor_table(E, 3, metric=metric, valid=valid)
    lazy = LazyNeighborTable(E, 3, metric=metric, valid=valid)
    anchors = torch.tensor([7, 5, 7, 49, 0, 12])
    assert torch.equal(lazy.lookup(anchors), full[anchors])
    assert lazy.cached_rows == 4  # 7, 49, 0, 12; the invalid 5 needs no computation
    assert torch.equal(lazy.lookup(torch.arange(50)), full)


def test_lazy_table_recomputes_after_E_changes():
    g = torch.Generator().manual_seed(4)
    E = torch.randn(30, 4, generator=g)
    lazy = LazyNeighborTable(E, 3)
    before = lazy.lookup(torch.arange(30))
    assert torch.equal(before, build_neighbor_table(E, 3))
    # In-place update bumps the version counter: noticed without invalidate().
    E.copy_(torch.randn(30, 4, generator=g))
    after = lazy.lookup(torch.arange(30))
    assert torch.equal(after, build_neighbor_table(E, 3))
    assert not torch.equal(before, after)
    # A write through .data is invisible to the version counter: invalidate() is the explicit path.
    E.data[:] = torch.randn(30, 4, generator=g)
    stale = lazy.lookup(torch.arange(30))
    assert torch.equal(stale, after)
    lazy.invalidate()
    assert torch.equal(lazy.lookup(torch.arange(30)), build_neighbor_table(E, 3))
    # Switching to a new matrix.
    E2 = torch.randn(30, 4, generator=g)
    lazy.invalidate(E2)
    assert torch.equal(lazy.lookup(torch.tensor([3, 9])), build_neighbor_table(E2, 3)[[3, 9]])


def test_k1_is_identity():
    E = torch.randn(9, 3)
    assert torch.equal(build_neighbor_table(E, 1), torch.arange(9).unsqueeze(1))


def test_valid_row_mask_from_a_count_a_list_and_never_mix_ids():
    assert valid_row_mask(6).tolist() == [True] * 6
    assert valid_row_mask(6, 4).tolist() == [True, True, True, True, False, False]  # ids 0..3, rows 4-5 padding
    assert valid_row_mask(6, 4, exclude=[1, 9]).tolist() == [True, False, True, True, False, False]
    assert valid_row_mask(6, [0, 2, 5, 7], exclude=[2]).tolist() == [True, False, False, False, False, True]
    assert valid_row_mask(3, 10).tolist() == [True] * 3  # a tokenizer larger than E: every row


def test_bf16_input_gives_the_fp32_table_over_valid_rows_only():
    # 1,800 tokenizer ids, 248 padding rows (never neighbors), never-mix id 7; a bf16 matrix (the engine's dtype)
    # must give the table of its exact values computed in fp32, not a bf16-rounded one.
    g = torch.Generator().manual_seed(5)
    E = torch.randn(2048, 64, generator=g).bfloat16()
    valid = valid_row_mask(2048, 1800, exclude=[7])
    anchors = torch.arange(0, 1800, 3)
    expected, _ = brute_force_rows(E, 3, "cosine", valid, anchors)
    full = build_neighbor_table(E, 3, valid=valid, chunk_rows=500)
    lazy = LazyNeighborTable(E, 3, valid=valid)
    assert torch.equal(full[anchors], expected)
    assert torch.equal(lazy.lookup(anchors), expected)
    assert not torch.isin(full[valid][:, 1:], torch.nonzero(~valid).flatten()).any()
    assert full[1900].tolist() == [1900] * 3 and full[7].tolist() == [7] * 3  # invalid anchors: themselves
    # Control: the same cosine top-k computed in bf16 picks other neighbors in many rows (ties after rounding).
    Eh = E / E.norm(dim=1, keepdim=True)
    s = (Eh[anchors] @ Eh.T).float()
    s[:, ~valid] = float("-inf")
    s[torch.arange(len(anchors)), anchors] = float("-inf")
    bf16_rows = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :2]
    differ = (bf16_rows != expected[:, 1:]).any(dim=1).float().mean().item()
    assert differ > 0.02, differ  # 4.5% of these rows


def _clustered(V: int, d: int, clusters: int, spread: float, seed: int) -> torch.Tensor:
    """Rows in tight clusters: members' cosines to an anchor differ by ~1e-3, below the bf16 prefilter's error bound
    (~0.012) and far above fp32 rounding, so the prefilter must hand the cluster to the fp32 rescoring."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    return centers[torch.arange(V) % clusters] + spread * torch.randn(V, d, generator=g)


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_cpu_bf16_prefilter_is_exact_on_near_ties(metric):
    E = _clustered(1500, 48, clusters=40, spread=0.1, seed=11)
    valid = valid_row_mask(1500, 1400, exclude=[3])
    prep = neighbors._Prepared(E, metric, valid)
    assert prep.lp_keys is not None  # the CPU path under test
    anchors = torch.arange(0, 1400, 7)
    expected, decided = brute_force_rows(E, 4, metric, valid, anchors)
    assert decided.float().mean() > 0.9  # rows whose order fp32 can tell at all (a few are closer than its rounding)
    full = build_neighbor_table(E, 4, metric=metric, valid=valid, chunk_rows=300)[anchors]
    lazy = LazyNeighborTable(E, 4, metric=metric, valid=valid).lookup(anchors)
    assert torch.equal(full[decided], expected[decided]) and torch.equal(lazy[decided], expected[decided])
    # Control: bf16 scores alone order the cluster members differently in most rows.
    s = (E[anchors].bfloat16() @ E.bfloat16().T).float()
    if metric == "cosine":
        s = s / E.norm(dim=1)
    s[torch.arange(len(anchors)), anchors] = float("-inf")
    assert (torch.topk(s, 3, dim=1).indices != expected[:, 1:]).any(dim=1).float().mean() > 0.3


def test_cpu_prefilter_falls_back_to_fp32_when_candidates_are_too_many(monkeypatch):
    monkeypatch.setattr(neighbors, "_MAX_CANDIDATES", 2)
    E = _clustered(300, 16, clusters=10, spread=0.1, seed=12)
    expected, decided = brute_force_rows(E, 3, "cosine", None, torch.arange(300))
    assert decided.float().mean() > 0.9
    assert torch.equal(build_neighbor_table(E, 3, chunk_rows=64)[decided], expected[decided])


def brute_force_rows(E: torch.Tensor, k: int, metric: str, valid: torch.Tensor | None,
                     anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised float64 reference: rows sorted by (score desc, id asc), and which rows fp32 can decide: the first k
    scores at least 2e-6 (relative to the largest |score|) apart, far above fp32 rounding."""
    E = E.double()
    if metric == "cosine":
        E = E / E.norm(dim=1, keepdim=True)
    s = E[anchors] @ E.T
    if metric == "l2":  # the fp32 path's own score: 2 q.k - ||k||^2
        s = 2 * s - (E * E).sum(dim=1)
    if valid is not None:
        s[:, ~valid] = float("-inf")
    s[torch.arange(len(anchors)), anchors] = float("-inf")
    vals, order = torch.sort(s, dim=1, descending=True, stable=True)
    gaps = (vals[:, : k - 1] - vals[:, 1:k]).min(dim=1).values
    decided = gaps > 2e-6 * s[s.isfinite()].abs().max()
    return torch.cat([anchors.unsqueeze(1), order[:, : k - 1]], dim=1), decided
