"""The engine's neighbor tables: one per metric over the current embedding matrix, rebuilt on every weight change.

Built over valid rows only (the tokenizer's ids minus the engine's never-mix ids, a mask set once at install) and in
fp32 whatever the engine's dtype (core.neighbors). An anchor outside the valid rows (argmax on a padding row, which a
trained model never produces) gets its own id repeated: its mixture is E[anchor] itself.

Modes: "full" builds the whole [V, k] table (1.7 s for 151,936 x 1,536 on an H200), on first use after install and
again at every weight load for each metric already in use; "lazy" computes rows for the anchors asked for, cached
until the next weight load (a full 152k table takes ~15 min on a 2-core CPU; on GPU the lazy lookup costs as much per
decode step as the paper's search, so the default there is "full"). No vLLM import.
"""

from __future__ import annotations

import time

import torch

from ngrpo_ray.core.neighbors import LazyNeighborTable, build_neighbor_table

MODES = ("lazy", "full")
# Rows per chunk of a full build: its scores take FULL_BUILD_CHUNK_ROWS x V x 4 B (0.29 GiB for the R1 vocabulary)
# beside the fp32 keys, both outside vLLM's reservation (planning.engine_memory counts them).
FULL_BUILD_CHUNK_ROWS = 512


def default_mode(device: torch.device) -> str:
    """"full" on CUDA (whole table per weight load), "lazy" elsewhere (CPU)."""
    return "full" if torch.device(device).type == "cuda" else "lazy"


def _release_search_memory(E: torch.Tensor) -> None:
    """Hand the full build's fp32 keys and score chunks back to CUDA: vLLM's sleep mode frees only its own pool,
    so cached blocks would otherwise sit beside the trainer through the update."""
    if E.is_cuda:
        torch.cuda.empty_cache()


class NeighborTables:
    """One neighbor table per metric over the current embedding matrix, rebuilt (or invalidated) on weight change."""

    def __init__(self, k_max: int, mode: str):
        if mode not in MODES:
            raise ValueError(f"neighbor_mode must be 'lazy' or 'full', got {mode!r}")
        self.k_max, self.mode = k_max, mode
        self._tables: dict[str, object] = {}
        self.E: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None  # [V] bool; None: every row (until set_valid)
        self.version = 0  # bumped on every rebind: the driver can see that a rebuild happened
        self.build_seconds = 0.0  # last full build (all metrics in use), or 0 in lazy mode

    def set_valid(self, valid: torch.Tensor | None) -> None:
        """Rows that may be neighbors ([V] bool on E's device); drops the tables built so far."""
        if valid is not None and self.E is not None and valid.shape != (self.E.shape[0],):
            raise ValueError(f"valid mask has shape {tuple(valid.shape)}, the embedding has {self.E.shape[0]} rows")
        self.valid = valid
        if self.E is not None:
            self.bind(self.E)

    def bind(self, E: torch.Tensor) -> None:
        """A new (or reloaded) embedding matrix: every table is rebuilt; in full mode now, for the metrics in use."""
        in_use = list(self._tables)
        self.E = E
        self._tables.clear()
        self.version += 1
        if self.mode == "full" and in_use:
            t0 = time.perf_counter()
            for metric in in_use:
                self._tables[metric] = self._build(metric)
            self.build_seconds = time.perf_counter() - t0
            _release_search_memory(E)

    def _build(self, metric: str):
        assert self.E is not None
        n_valid = self.E.shape[0] if self.valid is None else int(self.valid.sum())
        k = min(self.k_max, n_valid)
        if self.mode == "full":
            return build_neighbor_table(self.E, k, metric=metric, valid=self.valid, chunk_rows=FULL_BUILD_CHUNK_ROWS)
        return LazyNeighborTable(self.E, k, metric=metric, valid=self.valid)

    def rows(self, metric: str, anchors: torch.Tensor) -> torch.Tensor:
        table = self._tables.get(metric)
        if table is None:
            t0 = time.perf_counter()
            table = self._tables[metric] = self._build(metric)
            if self.mode == "full":
                self.build_seconds = time.perf_counter() - t0
                _release_search_memory(self.E)
        if isinstance(table, LazyNeighborTable):
            return table.lookup(anchors)
        return table[anchors]

    def stats(self) -> dict:
        return {"neighbor_mode": self.mode,
                "neighbor_valid_rows": None if self.valid is None else int(self.valid.sum()),
                "neighbor_rows": None if self.E is None else int(self.E.shape[0]),
                "neighbor_build_seconds": self.build_seconds}
