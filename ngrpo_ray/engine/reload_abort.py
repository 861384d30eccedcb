"""Undo a layerwise reload that will never finish (vLLM exposes none; its own sharded transfer restores the same way).

vLLM's nccl and ipc weight transfers start an update with ``initialize_layerwise_reload``: every layer's tensors are
swapped for meta tensors until its weights arrive (or until ``finalize``), the real ones kept aside. A trainer that
dies mid-update leaves the model that way, and the engine can neither generate nor start the next update. Putting
each waiting layer's own tensors back gives the engine a whole model again: the layers that had loaded hold the new
weights, the rest the old ones, and the next sync sends every weight again.
"""

from __future__ import annotations

import torch


def abort_layerwise_reload(model: torch.nn.Module) -> int:
    """Put back the tensors of every layer that is still waiting for weights; returns how many layers. A no-op (0) on
    a model that is not being reloaded layerwise (the CPU transport loads in place)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, LOADING_LAYERS, _place_kernel_tensors

    restored = 0
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:  # its own tensors, which the meta placeholders replaced
            _place_kernel_tensors(layer, info)
            restored += any(info.kernel_tensors)  # containers hold none of their own
        info.reset()  # drops the weights it had buffered
    LOADING_LAYERS.clear()
    return restored
