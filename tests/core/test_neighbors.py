"""Neighbor tables against a brute-force float64 reference, lazy table against the full one."""

import pytest
import torch

from ngrpo_ray.core.neighbors import METRICS, LazyNeighborTable, build_neighbor_table


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
