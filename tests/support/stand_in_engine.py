"""A plain torch model behind the RolloutEngine actor's weight-sync control plane, standing in for a vLLM engine in
the trainer-group tests (importable by Ray workers, unlike a test module). Its transfer engine is the real
ngrpo_gloo worker side."""

from __future__ import annotations

import torch


class _Loader(torch.nn.Module):
    """An HF model behind vLLM's ``load_weights`` contract (reads the stream lazily, keeps the names it loaded)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.loaded = model, []

    def load_weights(self, weights):
        params = dict(self.inner.named_parameters())  # tied lm_head is not a separate parameter
        with torch.no_grad():
            for n, t in weights:
                params[n].copy_(t)
                self.loaded.append(n)


class StandInEngine:
    """A plain torch model behind the RolloutEngine actor's weight-sync control plane, standing in for one vLLM
    engine; its transfer engine is the real ngrpo_gloo worker side."""

    def __init__(self, path: str):
        from types import SimpleNamespace

        from transformers import AutoModelForCausalLM

        from ngrpo_ray.engine.gloo_transfer import GlooWeightTransferEngine

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            for p in self.model.parameters():
                p.zero_()  # so that a missing tensor cannot pass for a received one
        vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                                      model_config=None)
        self.loader = _Loader(self.model)
        self.xfer = GlooWeightTransferEngine(None, vllm_config, torch.device("cpu"), self.loader)
        self.refreshed, self.version = 0, 0

    def ready(self):
        return True

    def init_weight_transfer_engine(self, init_info):
        self.xfer.init_transfer_engine(self.xfer.parse_init_info(init_info))

    def start_weight_update(self):
        self.loader.loaded = []
        self.xfer.start_weight_update()

    def update_weights(self, update_info):
        self.xfer.update_weights(update_info)

    def finish_weight_update(self, policy_version):
        self.xfer.finish_weight_update()
        self.refreshed, self.version = self.refreshed + 1, int(policy_version)
        return {**self.xfer.last_stats, "version": self.version}

    def shutdown_weight_transfer_engine(self):
        self.xfer.shutdown()

    def raw_broadcast(self, nbytes, chunk_mb=None):
        from ngrpo_ray.distributed.weight_sync import raw_broadcast_seconds

        return {"seconds": raw_broadcast_seconds(self.xfer.group, nbytes, chunk_mb)}

    def state(self):
        return ({n: p.detach().clone() for n, p in self.model.named_parameters()}, self.refreshed, self.version,
                list(self.loader.loaded))
