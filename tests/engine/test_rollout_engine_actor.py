"""The RolloutEngine Ray actor: generate -> ObjectRef[RolloutBatch], health, refit from a state dict, shutdown."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.core.rollout_batch import RolloutBatch

from hf_oracle import load_hf
from test_exactness import TEMPERATURE, check_batch_against_hf


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.mark.engine
def test_actor_generate_refit_health_shutdown(ray_local, tiny_models):
    from ngrpo_ray.distributed.rollout_engine import make_rollout_engine

    ray = ray_local
    spec = {"model": tiny_models["llama"], "max_model_len": 256, "kv_cache_gib": 0.125}
    engine = make_rollout_engine(spec, num_cpus=0.5)
    try:
        health = ray.get(engine.health.remote(), timeout=300)
        assert health["ok"] and health["policy_version"] == 0
        # on CPU the actor hosts vLLM's engine core itself: no spawned engine-core and worker processes to import
        # vLLM again (the actor started in about a third of the time)
        assert health["engine_core"] == "InprocClient"
        assert health["kv_cache_tokens"] == _kv_tokens(tiny_models["llama"], 0.125 * 2**30)
        prompts = [[2 + i, 3 + i, 4 + i] for i in range(4)]
        sampling = {"temperature": TEMPERATURE, "max_tokens": 16}
        ref = engine.generate.remote(prompts, sampling, MixingParams(rho=0.5, k=3), 0, 2)
        assert isinstance(ref, ray.ObjectRef)
        batch = ray.get(ref, timeout=300)
        assert isinstance(batch, RolloutBatch) and len(batch) == 8
        assert batch.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert batch.sample_index.tolist() == [0, 1] * 4
        assert all(isinstance(t, str) for t in batch.response_text) and batch.timings["tokens"] == batch.num_tokens

        model = load_hf(tiny_models["llama"])
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
        ray.get(engine.refit_from_state_dict.remote(model.state_dict(), 1), timeout=300)
        assert ray.get(engine.health.remote())["policy_version"] == 1
        with pytest.raises(ray.exceptions.RayTaskError, match="policy version 0"):
            ray.get(engine.generate.remote(prompts, sampling, MixingParams(rho=0.5), 0))
        batch = ray.get(engine.generate.remote(prompts, sampling, MixingParams(rho=0.5, k=3), 1, 2), timeout=300)
        assert batch.policy_version.tolist() == [1] * 8
        assert check_batch_against_hf(model, batch, k=3, tau=TEMPERATURE)["mixed"] > 0  # the refitted weights
    finally:
        assert ray.get(engine.shutdown.remote(), timeout=120)
        ray.kill(engine)


def _kv_tokens(model_path: str, nbytes: float, block_size: int = 128) -> int:
    """The tokens a KV cache of ``nbytes`` holds, in whole blocks: K and V of every layer's kv heads, in the model's
    dtype (what the training run logs as engine.kv_cache_tokens)."""
    import json
    from pathlib import Path

    c = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_token = c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * torch.finfo(
        getattr(torch, c.get("torch_dtype") or c.get("dtype") or "float32")).bits // 8
    return int(nbytes) // (per_token * block_size) * block_size
