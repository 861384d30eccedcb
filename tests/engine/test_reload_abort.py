"""``abort_layerwise_reload``: an update that vLLM's layerwise reload started and no trainer will finish is undone.

vLLM's own reload functions on a stand-in model of two layers with weight loaders (a GPU engine's nccl and ipc
transfers load this way; the CPU transport loads in place and is unaffected). Started, then the first layer's weight
arrives and the trainer dies: the waiting layer sat on the meta device. After the abort every tensor is real again,
the first layer holds its new weight and the second its old one, and the next full update loads both.
"""

from __future__ import annotations

import torch
from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload, initialize_layerwise_reload,
                                                     record_metadata_for_reloading)

from ngrpo_ray.engine.reload_abort import abort_layerwise_reload


class _Layer(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((4, 3), value), requires_grad=False)
        self.weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)


def test_abort_restores_every_waiting_layer_and_the_next_update_loads():
    model = torch.nn.Sequential(_Layer(1.0), _Layer(2.0))
    kernels = [layer.weight for layer in model]
    record_metadata_for_reloading(model)  # vLLM does this when it loads the model
    assert abort_layerwise_reload(model) == 0  # nothing is being reloaded: a no-op

    initialize_layerwise_reload(model)  # start_weight_update
    model[0].weight.weight_loader(model[0].weight, torch.full((4, 3), 5.0))  # the first layer's bytes arrive
    assert model[1].weight.is_meta  # the second waits on the meta device: the engine cannot run
    assert abort_layerwise_reload(model) == 1
    assert not any(p.is_meta for p in model.parameters())
    assert [layer.weight is kernel for layer, kernel in zip(model, kernels)] == [True, True]  # the real storage
    assert float(model[0].weight[0, 0]) == 5.0 and float(model[1].weight[0, 0]) == 2.0

    initialize_layerwise_reload(model)  # the next sync sends every weight again
    for i, layer in enumerate(model):
        layer.weight.weight_loader(layer.weight, torch.full((4, 3), 10.0 + i))
    finalize_layerwise_reload(model, None)
    assert [float(layer.weight[0, 0]) for layer in model] == [10.0, 11.0]
    assert [layer.weight is kernel for layer, kernel in zip(model, kernels)] == [True, True]
