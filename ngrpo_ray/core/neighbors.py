"""Nearest-neighbor tables over the input-embedding matrix E (paper eq. 7-8).

Row v of a table is ``[v, n_1, ..., n_{k-1}]``: the anchor itself, then its k-1 nearest *valid* rows, most
similar first, ties broken by the lower token id. Everything is a "score, larger is nearer": cosine and dot use the
similarity, L2 and L1 the negated distance. The full build is chunked over rows so the peak extra memory is
O(chunk_rows * V) and uses matmuls (cosine, dot, L2) or ``torch.cdist`` (L1, slower).

Scores are computed in fp32 whatever E's dtype: a bf16 cosine table picks other neighbors in 8.4% of the rows of a
152k x 1536 matrix (ties, measured on an H200), and the fp32 build costs 1.7 s there. Valid rows are the ids a
tokenizer can produce minus the ids configured never to mix (``valid_row_mask``); the padding rows past the
tokenizer (151,936 rows vs 151,650 ids for the R1 vocabulary) stay untrained in real checkpoints.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch

METRICS = ("cosine", "l2", "l1", "dot")


def valid_row_mask(num_rows: int, token_ids: int | Sequence[int] | None = None, exclude: Iterable[int] = (),
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[num_rows] bool: rows that may be neighbors. ``token_ids`` is the tokenizer's id set, as a count n (ids
    0..n-1, the usual contiguous vocabulary) or a list; None means every row. ``exclude`` (never-mix ids) is removed.
    Ids at or past num_rows are ignored."""
    if token_ids is None:
        mask = torch.ones(num_rows, dtype=torch.bool)
    elif isinstance(token_ids, int):
        if token_ids < 1:
            raise ValueError(f"token_ids count must be >= 1, got {token_ids}")
        mask = torch.arange(num_rows) < token_ids
    else:
        ids = torch.tensor([int(i) for i in token_ids], dtype=torch.long)
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[ids[(ids >= 0) & (ids < num_rows)]] = True
    drop = torch.tensor([int(i) for i in exclude], dtype=torch.long)
    if drop.numel():
        mask[drop[(drop >= 0) & (drop < num_rows)]] = False
    return mask.to(device)


def _check_args(E: torch.Tensor, k: int, metric: str, valid: torch.Tensor | None) -> None:
    if E.dim() != 2:
        raise ValueError(f"E must be [V, d], got shape {tuple(E.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (E.shape[0],)):
        raise ValueError(f"valid must be a bool tensor of shape [{E.shape[0]}], got {valid.dtype} {tuple(valid.shape)}")
    n_valid = E.shape[0] if valid is None else int(valid.sum())
    if k - 1 > n_valid - 1:
        raise ValueError(f"k={k} needs at least {k} valid rows, E has {n_valid}")


class _Prepared:
    """What every chunk needs, computed once per E: normalised rows (cosine), squared norms (L2), column mask.
    Everything is fp32 (a copy when E is bf16 / fp16): the table must not depend on the engine's dtype."""

    def __init__(self, E: torch.Tensor, metric: str, valid: torch.Tensor | None):
        self.metric = metric
        self.V = E.shape[0]
        with torch.no_grad():
            if metric == "cosine":  # one fp32 copy, normalised in place: the build's peak is one V x d x 4 B
                E = E.detach().to(torch.float32, copy=True)
                norms = E.norm(dim=1, keepdim=True).clamp_min(torch.finfo(E.dtype).tiny)
                self.keys = E.div_(norms)
            else:
                E = E.detach().float()
                self.keys = E
            # L2: ||a-b||^2 = ||a||^2 + ||b||^2 - 2 a.b; ||a||^2 is constant per row, so score = 2 a.b - ||b||^2.
            self.sq_norms = (E * E).sum(dim=1) if metric == "l2" else None
        # Additive column bias: -inf at invalid columns so they never enter the top-k.
        self.col_bias = None
        if valid is not None:
            self.col_bias = torch.zeros(self.V, dtype=E.dtype, device=E.device)
            self.col_bias[~valid.to(E.device)] = float("-inf")
        # CPU: a bf16 copy of the keys for the prefilter (half the bytes per pass over E, and faster matmuls);
        # the fp32 rescoring of its candidates keeps the table exact (see _top_rows_prefiltered).
        self.lp_keys = None
        if prefilter_applies(self.keys, metric):
            self.lp_keys = self.keys.to(torch.bfloat16)
            self.key_norm_max = float(self.keys.norm(dim=1).max())

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, V] scores (larger = nearer) of the rows with ids ``rows`` against every column."""
        q = self.keys[rows]
        if self.metric in ("cosine", "dot"):
            s = q @ self.keys.T
        elif self.metric == "l2":
            s = torch.addmm(self.sq_norms.neg().unsqueeze(0), q, self.keys.T, alpha=2.0)
        else:  # l1
            s = torch.cdist(q.unsqueeze(0), self.keys.unsqueeze(0), p=1.0).squeeze(0).neg_()
        if self.col_bias is not None:
            s += self.col_bias
        return s


def prefilter_applies(keys: torch.Tensor, metric: str) -> bool:
    """The bf16 prefilter serves matmul metrics on CPU (GPU builds stay fp32: 1.7 s for the R1 vocabulary)."""
    return keys.device.type == "cpu" and metric in ("cosine", "dot", "l2")


# Bound on |bf16 score - fp32 score| per unit of ||q|| * max_j ||k_j||: both inputs rounded to bf16 (2 x 2^-8, unit
# roundoff is 2^-9, doubled for safety), the bf16 output rounded once more (2^-8 of |score| <= ||q|| ||k||), and
# fp32 accumulation over d terms (d x 2^-23, added per call).
_BF16_REL = 2.0 * 2.0**-8 + 2.0**-8
_MAX_CANDIDATES = 4096  # beyond this many candidates per row the fp32 pass is cheaper than rescoring
_RESCORE_ELEMENTS = 1 << 24  # fp32 elements of one rescoring gather (64 MB)


def _top_rows_prefiltered(prep: _Prepared, rows: torch.Tensor, k: int) -> torch.Tensor | None:
    """[n, k-1] nearest valid columns of each anchor, exact: bf16 scores over every column pick the candidates whose
    bf16 score is within twice the error bound of the (k-1)-th best, which provably holds every true top-(k-1)
    column (each is at most one bound below its fp32 score, and the (k-1)-th best bf16 score is at most one bound above
    the (k-1)-th best fp32 score); those are rescored in fp32 and ordered by (score desc, id asc), the rule of the
    fp32 path. None when the candidates are too many to rescore (near-duplicate rows): the caller scores in fp32."""
    q32 = prep.keys[rows]
    s = (prep.lp_keys @ q32.to(torch.bfloat16).T).T.float()  # [V, d] x [d, n]: the fast layout for few anchors
    err = (_BF16_REL + q32.shape[1] * 2.0**-23) * q32.norm(dim=1) * prep.key_norm_max  # [n]
    if prep.metric == "l2":  # score = 2 q.k - ||k||^2, the norms in fp32
        s.mul_(2.0).sub_(prep.sq_norms)
        err = 2.0 * err
    if prep.col_bias is not None:
        s += prep.col_bias
    n = rows.numel()
    s[torch.arange(n, device=s.device), rows] = float("-inf")  # never the anchor itself
    kth = torch.topk(s, k - 1, dim=1).values[:, -1]
    width = int((s >= (kth - 2.0 * err).unsqueeze(1)).sum(dim=1).max())
    if width > _MAX_CANDIDATES:
        return None
    cand = torch.topk(s, width, dim=1).indices  # [n, width]: every row's candidates (some rows get a few more)
    cand = torch.sort(cand, dim=1).values  # ascending ids, so a stable sort by score breaks ties by lower id
    dropped = s.gather(1, cand) == float("-inf")  # the anchor or an invalid column, picked to fill the width
    exact = torch.empty(cand.shape, dtype=torch.float32, device=s.device)
    step = max(1, _RESCORE_ELEMENTS // (width * q32.shape[1]))  # bound the [rows, width, d] gather
    for a in range(0, n, step):
        exact[a : a + step] = (prep.keys[cand[a : a + step]] * q32[a : a + step].unsqueeze(1)).sum(dim=-1)
    if prep.metric == "l2":
        exact.mul_(2.0).sub_(prep.sq_norms[cand])
    exact[dropped] = float("-inf")
    order = torch.sort(exact, dim=1, descending=True, stable=True).indices[:, : k - 1]
    return cand.gather(1, order)


def _top_rows(prep: _Prepared, rows: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] table rows for anchor ids ``rows`` (not yet handling invalid anchors)."""
    n = rows.numel()
    out = rows.unsqueeze(1).expand(n, k).clone()
    if k == 1:
        return out
    if prep.lp_keys is not None:
        top = _top_rows_prefiltered(prep, rows, k)
        if top is not None:
            out[:, 1:] = top
            return out
    s = prep.scores(rows)
    s[torch.arange(n, device=s.device), rows] = float("-inf")  # never the anchor itself
    m = min(k, prep.V)  # one extra to detect ties that straddle the cut
    vals, idx = torch.topk(s, m, dim=1, largest=True, sorted=True)
    top_v, top_i = vals[:, : k - 1], idx[:, : k - 1]
    # Inside the kept set, order by (score desc, id asc): sort by id, then stable sort by score.
    by_id = torch.sort(top_i, dim=1).indices
    top_i, top_v = top_i.gather(1, by_id), top_v.gather(1, by_id)
    by_score = torch.sort(top_v, dim=1, descending=True, stable=True).indices
    top_i = top_i.gather(1, by_score)
    out[:, 1:] = top_i
    # A tie across the cut (k-th best == (k-1)-th best) means topk may have kept a higher id: redo those rows exactly.
    if m == k:
        straddle = (vals[:, k - 1] == vals[:, k - 2]).nonzero().flatten().tolist()
        for r in straddle:
            thr = vals[r, k - 2]
            cand = (s[r] >= thr).nonzero().flatten()  # ascending ids
            order = torch.sort(s[r, cand], descending=True, stable=True).indices
            out[r, 1:] = cand[order[: k - 1]]
    return out


def build_neighbor_table(
    E: torch.Tensor,
    k: int,
    metric: str = "cosine",
    valid: torch.Tensor | None = None,
    chunk_rows: int = 2048,
    on_chunk: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """[V, k] int64; row v = [v, n_1, ..., n_{k-1}]: v itself then its k-1 nearest valid rows (most similar first,
    ties broken by lower id), never v itself again, never an invalid row. Rows of invalid v hold v repeated (a
    mixture over such a row is E[v] itself). Chunked over rows so peak memory is O(chunk_rows * V); computed on E's
    device, in fp32 whatever E's dtype. ``on_chunk(rows_done, rows_total)`` is called after each chunk (progress of a
    full-vocabulary build)."""
    _check_args(E, k, metric, valid)
    V = E.shape[0]
    prep = _Prepared(E, metric, valid)
    table = torch.arange(V, device=E.device).unsqueeze(1).repeat(1, k)
    if k == 1:
        return table
    anchors = torch.arange(V, device=E.device)
    if valid is not None:
        anchors = anchors[valid.to(E.device)]
    with torch.no_grad():
        for start in range(0, anchors.numel(), chunk_rows):
            rows = anchors[start : start + chunk_rows]
            table[rows] = _top_rows(prep, rows, k)
            if on_chunk is not None:
                on_chunk(start + rows.numel(), anchors.numel())
    return table


class LazyNeighborTable:
    """Table rows computed only for the anchors asked for, cached until E changes.

    A change of E is noticed by its data pointer, shape or autograd version counter (in-place updates such as
    ``E.copy_(...)`` bump it). Writes through ``E.data``, or into an inference tensor (which has no counter), are not
    seen: call ``invalidate()`` after them.
    """

    def __init__(self, E: torch.Tensor, k: int, metric: str = "cosine", valid: torch.Tensor | None = None):
        _check_args(E, k, metric, valid)
        self.k, self.metric, self.valid = k, metric, valid
        self._bind(E)

    def _bind(self, E: torch.Tensor) -> None:
        self.E = E
        self._key = self._fingerprint(E)
        self._prep: _Prepared | None = None  # built on first lookup
        self._rows = torch.arange(E.shape[0], device=E.device).unsqueeze(1).repeat(1, self.k)
        self._have = torch.zeros(E.shape[0], dtype=torch.bool, device=E.device)
        if self.valid is not None:  # invalid anchors are final already: v repeated
            self._have |= ~self.valid.to(E.device)

    @staticmethod
    def _fingerprint(E: torch.Tensor) -> tuple:
        # An inference tensor has no version counter (the matrix a tensor-parallel engine gathers from its shards is
        # one, a fresh copy at every weight load that is rebound, never updated in place).
        return (E.data_ptr(), tuple(E.shape), None if E.is_inference() else E._version)

    def invalidate(self, E: torch.Tensor | None = None) -> None:
        """Drop every cached row; with ``E`` given, also switch to that matrix."""
        self._bind(self.E if E is None else E)

    @property
    def cached_rows(self) -> int:
        have = self._have if self.valid is None else self._have & self.valid.to(self._have.device)
        return int(have.sum())

    def lookup(self, anchors: torch.Tensor) -> torch.Tensor:
        """[n] anchor ids -> [n, k] table rows."""
        if self._fingerprint(self.E) != self._key:
            self.invalidate()
        anchors = anchors.to(self._rows.device, torch.long)
        missing = anchors[~self._have[anchors]].unique()
        if missing.numel():
            if self._prep is None:
                self._prep = _Prepared(self.E, self.metric, self.valid)
            with torch.no_grad():
                self._rows[missing] = _top_rows(self._prep, missing, self.k)
            self._have[missing] = True
        return self._rows[anchors]


def time_full_build(V: int = 151936, d: int = 1536, k: int = 3, metric: str = "cosine", chunk_rows: int = 2048,
                    seed: int = 0, on_chunk: Callable[[int, int], None] | None = None) -> float:
    """Seconds for one full ``build_neighbor_table`` on a random fp32 [V, d] matrix (generation not timed)."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(V, d, generator=g)
    t0 = time.perf_counter()
    table = build_neighbor_table(E, k, metric=metric, chunk_rows=chunk_rows, on_chunk=on_chunk)
    seconds = time.perf_counter() - t0
    assert table.shape == (V, k)
    return seconds
