"""The vLLM worker extension: ``LLM(..., worker_extension_cls="ngrpo_ray.engine.worker_extension.NgrpoWorkerExtension")``.

vLLM imports this module inside each worker process before the model is built, so importing it registers the
MixingEmbedding override there (and only in engines that name this extension). Every RPC method:
- has the ``ngrpo_`` prefix (vLLM asserts no clash with Worker attributes),
- catches its own exceptions and returns ``{"ok": False, "error": ...}`` (an exception escaping an RPC is treated
  as fatal by the engine core); the driver side (records_client.check) raises it,
- returns plain lists / numbers (numpy arrays do not survive the msgpack transport).

The trainer->engine weight transport is vLLM's weight-transfer API (the Worker's own ``init_weight_transfer_engine``
/ ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``); importing this module registers the CPU
backend, ``ngrpo_gloo`` (``ngrpo_ray.engine.gloo_transfer``), in this worker process, before vLLM creates the engine
named by ``weight_transfer_config``. It is required: an engine without it could not follow the trainer, so a failed
import stops the worker with the cause instead of serving stale weights. After every load the engine actor calls
``ngrpo_weights_loaded`` (neighbor tables, policy version, timings).
"""

from __future__ import annotations

import functools
import time
import traceback
from typing import Any, Iterable

import torch

from ngrpo_ray.engine.cpu_weights import keep_cpu_linear_weights, rebuild_cpu_gemm_handlers
from ngrpo_ray.engine.embedding_patch import MixingEmbedding, full_weight, register_mixing_embedding
from ngrpo_ray.engine.reload_abort import abort_layerwise_reload
from ngrpo_ray.engine.refusals import check_worker_setup

register_mixing_embedding()
keep_cpu_linear_weights()

try:  # the trainer->engine transport on CPU: required (no silent stand-in)
    from ngrpo_ray.engine.gloo_transfer import register_gloo_backend
except ImportError as exc:
    raise ImportError(f"the engine's weight transport (ngrpo_ray.engine.gloo_transfer) failed to import: {exc!r}; "
                      "the engine cannot receive the trainer's weights without it") from exc
register_gloo_backend()


def _ok(**payload: Any) -> dict:
    return {"ok": True, **payload}


def _err(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def rpc(method):
    """An extension RPC: runs under inference mode (like the engine's steps, whose tensors the hook shares) and
    turns every exception into an error value for the driver."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            with torch.inference_mode():
                return _ok(**method(self, *args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the driver
            return _err(exc)
    return wrapper


class NgrpoWorkerExtension:
    """Mixed into vLLM's Worker class; ``self`` is the worker (self.model_runner, self.reload_weights, ...)."""

    # ---- helpers (no RPC) --------------------------------------------------------------------------------------
    def _ngrpo_embedding(self) -> MixingEmbedding:
        found = {id(m): m for m in self.model_runner.model.modules() if isinstance(m, MixingEmbedding)}
        if len(found) != 1:
            raise RuntimeError(f"expected exactly one MixingEmbedding in the model, found {len(found)}: was the "
                               f"engine built with worker_extension_cls naming this module?")
        return next(iter(found.values()))

    def _ngrpo_hook(self):
        hook = getattr(self, "_ngrpo_hook_obj", None)
        if hook is None:
            raise RuntimeError("ngrpo hook not installed: call ngrpo_install first")
        return hook

    # ---- RPCs --------------------------------------------------------------------------------------------------
    @rpc
    def ngrpo_install(self, seed: int = 0, table_slots: int | None = None, neighbor_mode: str | None = None,
                      neighbor_ids: int | list[int] | None = None, never_neighbor_ids: list[int] = (),
                      neighbor_metrics: list[str] = ()) -> dict:
        """neighbor_mode None: "full" on CUDA, "lazy" on CPU. neighbor_ids: the tokenizer's ids (a count n for
        0..n-1, or a list; None: every embedding row); never_neighbor_ids: never-mix ids, never neighbors either.
        neighbor_metrics: the tables built now (a full build takes ~1.7 s on an H200) rather than inside the first
        mixed decode step, where it would stall the step and break the overlap of async scheduling."""
        from ngrpo_ray.core.neighbors import valid_row_mask
        from ngrpo_ray.engine.mixing_hook import MixingHook
        from ngrpo_ray.engine.neighbor_tables import default_mode

        check_worker_setup(self.model_runner, self.vllm_config)
        old = getattr(self, "_ngrpo_hook_obj", None)
        if old is not None:
            old.remove()
        emb = self._ngrpo_embedding()
        vocab = int(self.model_runner.model_config.get_vocab_size())
        hook = MixingHook(self.model_runner, emb, vocab, seed, neighbor_mode or default_mode(emb.weight.device))
        hook.tables.set_valid(valid_row_mask(vocab, neighbor_ids, never_neighbor_ids, device=hook.device))
        hook.set_slots(hook.capacity if table_slots is None else int(table_slots))
        for metric in neighbor_metrics:
            hook.tables.rows(str(metric), torch.zeros(0, dtype=torch.long, device=hook.device))
        emb.ngrpo_stale.zero_()
        self._ngrpo_hook_obj = hook
        return {**hook.stats(), **hook.tables.stats()}

    @rpc
    def ngrpo_set_slots(self, table_slots: int) -> dict:
        hook = self._ngrpo_hook()
        hook.set_slots(int(table_slots))
        return hook.stats()

    @rpc
    def ngrpo_records(self, virtual_ids: list[int]) -> dict:
        return self._ngrpo_hook().records([int(v) for v in virtual_ids])

    @rpc
    def ngrpo_stats(self) -> dict:
        hook = self._ngrpo_hook()
        return {**hook.stats(), **hook.tables.stats()}

    @rpc
    def ngrpo_neighbor_rows(self, anchors: list[int], metric: str = "cosine") -> dict:
        """Neighbor-table rows of some anchors (tests use it to see a rebuild after a refit)."""
        hook = self._ngrpo_hook()
        a = torch.tensor(anchors, dtype=torch.long, device=hook.device)
        return {"rows": hook.tables.rows(metric, a).tolist(), "version": hook.tables.version, **hook.tables.stats()}

    @rpc
    def ngrpo_embedding_rows(self, ids: list[int]) -> dict:
        w = full_weight(self._ngrpo_embedding(), int(self.model_runner.model_config.get_vocab_size()))
        return {"rows": w[torch.tensor(ids, dtype=torch.long, device=w.device)].float().tolist()}

    @rpc
    def ngrpo_refit_from_path(self, path: str) -> dict:
        """Load a safetensors file (or a folder of them) in place, then rebuild the neighbor tables."""
        self.ngrpo_load_weights(_iter_safetensors(path))
        return self._ngrpo_hook().stats()

    @rpc
    def ngrpo_refit_from_state_dict(self, state: dict) -> dict:
        """Load {name: tensor} in place (small models / tests; big ones go through a file or the transport)."""
        self.ngrpo_load_weights((k, v) for k, v in state.items())
        return self._ngrpo_hook().stats()

    @rpc
    def ngrpo_weights_loaded(self, policy_version: int) -> dict:
        """After vLLM's finish_weight_update: rebuild what depends on the weights (neighbor tables), record the
        policy version, and report the transfer engine's timings plus this refresh's."""
        t0 = time.monotonic()
        self.ngrpo_after_weights_changed()
        self._ngrpo_policy_version = int(policy_version)
        stats = dict(getattr(self.weight_transfer_engine, "last_stats", None) or {})
        stats["refresh_seconds"] = time.monotonic() - t0
        # the engine's side of a sync beyond the transport: loading (not waiting for bytes), re-packing, refreshing
        stats["engine_load_seconds"] = sum(stats.get(k, 0.0) for k in ("load_seconds", "repack_seconds",
                                                                          "refresh_seconds"))
        return {**stats, "version": int(policy_version)}

    @rpc
    def ngrpo_abandon_weight_update(self) -> dict:
        """Before (re)joining a transfer: an update a dead trainer left half done (started, never finished) would make
        vLLM refuse the next start_weight_update, and under vLLM's layerwise reload (nccl, ipc) it left the layers
        still waiting for weights on the meta device: they get their own tensors back (engine.reload_abort). The next
        sync sends every weight again."""
        abandoned = bool(getattr(self, "_weight_update_active", False))
        restored = 0
        if abandoned:
            restored = abort_layerwise_reload(self.weight_transfer_engine.model)  # the update's target model
            self.weight_transfer_engine.reset_weight_update_target()
            self._weight_update_active = False
        return {"abandoned": abandoned, "layers_restored": restored}

    @rpc
    def ngrpo_policy_version(self) -> dict:
        return {"version": int(getattr(self, "_ngrpo_policy_version", 0))}

    @rpc
    def ngrpo_raw_broadcast(self, nbytes: int, chunk_mb: float | None = None) -> dict:
        """Receiving end of ``weight_sync.raw_broadcast_seconds`` on the ngrpo_gloo group (the benchmark's floor)."""
        from ngrpo_ray.distributed.weight_sync import raw_broadcast_seconds

        group = getattr(self.weight_transfer_engine, "group", None)
        if group is None:
            raise RuntimeError("ngrpo_raw_broadcast needs an initialized ngrpo_gloo weight transfer")
        return {"seconds": raw_broadcast_seconds(group, nbytes, chunk_mb)}

    @rpc
    def ngrpo_reset_table(self) -> dict:
        """Clear the stale counter (after an overflow was reported and handled)."""
        self._ngrpo_embedding().ngrpo_stale.zero_()
        return self._ngrpo_hook().stats()

    def ngrpo_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Not an RPC (raises): the single place every weight transport goes through."""
        # In place through the model's own weight loaders (fused qkv / gate_up handled there). On CPU the weights
        # were kept at load (cpu_weights.py) and the packed GEMM handlers are rebuilt from them afterwards.
        model = self.model_runner.model
        with torch.inference_mode():  # the model's tensors were created in inference mode
            model.load_weights(weights)
            rebuild_cpu_gemm_handlers(model)
            self.ngrpo_after_weights_changed()

    def ngrpo_after_weights_changed(self) -> None:
        hook = getattr(self, "_ngrpo_hook_obj", None)
        if hook is not None:
            hook.rebind_embedding(self._ngrpo_embedding())


def _iter_safetensors(path: str) -> Iterable[tuple[str, torch.Tensor]]:
    from pathlib import Path

    from safetensors.torch import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .safetensors file at {path}")
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)
