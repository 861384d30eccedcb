"""The ring table under vLLM's layerwise reload, the load path of its nccl and ipc weight transfers (GPU engines).

vLLM's own reload functions run on a stand-in embedding that carries the real ring buffers (``add_ring_buffers``)
and a ``weight`` with a weight loader, as a reload sees the MixingEmbedding. Counted as weights (vLLM's default), the
ring kept the embedding waiting for ``finalize`` with its received weight buffered, and went to the meta device to be
materialized again. With ``keep_ring_out_of_weight_reload`` the embedding is loaded as soon as its weight arrives, the
ring never leaves its storage, and its contents survive the reload.
"""

from __future__ import annotations

import pytest
import torch
from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload, initialize_layerwise_reload,
                                                     record_metadata_for_reloading)
from vllm.model_executor.model_loader.reload import meta
from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

from ngrpo_ray.engine.embedding_patch import RING_BUFFERS, add_ring_buffers, keep_ring_out_of_weight_reload


class _Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(100, 8), requires_grad=False)
        self.weight.weight_loader = lambda param, loaded: param.data.copy_(loaded)
        add_ring_buffers(self, 64, 4, True, 8, torch.float32, "cpu")  # with the noise table, as STHT builds it


def _reload(skip_ring: bool) -> dict:
    """One reload of a new embedding weight; what was seen between its arrival and finalize, and after."""
    saved = set(meta.SKIP_LOAD_TENSORS), set(meta.SKIP_TENSORS)
    if skip_ring:
        keep_ring_out_of_weight_reload()
    else:
        meta.SKIP_LOAD_TENSORS.difference_update(RING_BUFFERS)
        meta.SKIP_TENSORS.difference_update(RING_BUFFERS)
    try:
        model = torch.nn.Sequential(_Embedding())
        emb = model[0]
        emb.ngrpo_ids.fill_(7)
        emb.ngrpo_noise.fill_(3.0)
        storage = {name: getattr(emb, name).data_ptr() for name in RING_BUFFERS}
        record_metadata_for_reloading(model)  # vLLM does this when it loads the model
        initialize_layerwise_reload(model)  # start_weight_update
        ring_on_meta = emb.ngrpo_noise.is_meta
        new = torch.randn(100, 8)
        emb.weight.weight_loader(emb.weight, new)  # update_weights: the embedding's bytes arrive
        info = get_layerwise_info(emb)
        loaded_at_arrival = torch.equal(emb.weight, new) if not emb.weight.is_meta else False
        buffered = len(info.loaded_weights)
        finalize_layerwise_reload(model, None)  # finish_weight_update
        return {"ring_on_meta": ring_on_meta, "loaded_at_arrival": loaded_at_arrival, "buffered": buffered,
                "loaded": torch.equal(emb.weight, new),
                "ring_kept": bool((emb.ngrpo_ids == 7).all() and (emb.ngrpo_noise == 3.0).all()),
                "ring_storage_kept": all(getattr(emb, n).data_ptr() == p for n, p in storage.items())}
    finally:
        meta.SKIP_LOAD_TENSORS.clear()
        meta.SKIP_LOAD_TENSORS.update(saved[0])
        meta.SKIP_TENSORS.clear()
        meta.SKIP_TENSORS.update(saved[1])


def test_the_ring_buffers_are_the_ones_kept_out():
    module = torch.nn.Module()
    add_ring_buffers(module, 8, 3, False, 4, torch.float32, "cpu")
    assert {name for name, _ in module.named_buffers()} == set(RING_BUFFERS)


@pytest.mark.parametrize("skip_ring", [False, True])
def test_reload_loads_the_embedding_on_arrival_and_leaves_the_ring(skip_ring):
    r = _reload(skip_ring)
    assert r["loaded"] and r["ring_kept"] and r["ring_storage_kept"], r  # correct either way
    if skip_ring:
        assert r == {"ring_on_meta": False, "loaded_at_arrival": True, "buffered": 0, "loaded": True,
                     "ring_kept": True, "ring_storage_kept": True}
    else:  # vLLM's default: the embedding waits for finalize with its weight buffered, the ring goes to meta
        assert r["ring_on_meta"] and not r["loaded_at_arrival"] and r["buffered"] == 1, r
