"""Colocated engines on a GPU: vLLM sleep mode (level 1) frees the engine's GPU memory for the trainer's update, and
after wake-up and a weight load the engine serves the new weights. Runs only where CUDA is present (marker `gpu`); on
CPU the engine's sleep is a no-op that says so (checked here without CUDA)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams


def test_cpu_engine_sleep_is_a_stated_no_op():
    from ngrpo_ray.distributed.rollout_engine import RolloutEngineImpl
    from ngrpo_ray.engine.llm_factory import EngineSpec

    engine = RolloutEngineImpl.__new__(RolloutEngineImpl)  # no LLM is built: sleep must not touch it
    engine.spec = EngineSpec(model="unused")
    engine.llm = None
    assert engine.sleep() == {"slept": False, "reason": "sleep mode is off (vLLM's sleep mode needs CUDA)"}
    assert engine.wake_up() == {"woke": False}


@pytest.mark.gpu
@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (a CUDA machine without it: tests/gpu_device_check.sh)")
def test_sleep_frees_gpu_memory_and_wake_then_refit_serves_new_weights(tiny_models):
    from hf_oracle import load_hf

    from ngrpo_ray.distributed.rollout_engine import RolloutEngineImpl

    spec = {"model": tiny_models["llama"], "max_model_len": 256, "kv_cache_gib": None,
            "gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    engine = RolloutEngineImpl(spec)
    try:
        prompts = [[2 + i, 3 + i, 4 + i] for i in range(4)]
        greedy = {"temperature": 1e-5, "max_tokens": 16}
        before = engine.generate(prompts, greedy, MixingParams(rho=0.0), 0)
        free_awake = torch.cuda.mem_get_info()[0]
        assert engine.sleep()["slept"]
        free_asleep = torch.cuda.mem_get_info()[0]
        # the KV cache (30% of the GPU, less the tiny weights) is released while asleep
        assert free_asleep - free_awake > 0.2 * torch.cuda.get_device_properties(0).total_memory
        assert engine.wake_up()["woke"]
        again = engine.generate(prompts, greedy, MixingParams(rho=0.0), 0)
        assert [r.tolist() for r in again.response_ids] == [r.tolist() for r in before.response_ids]
        model = load_hf(tiny_models["llama"])
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        engine.sleep()
        engine.wake_up()
        engine.refit_from_state_dict(model.state_dict(), 1)
        after = engine.generate(prompts, greedy, MixingParams(rho=0.0), 1)
        assert [r.tolist() for r in after.response_ids] != [r.tolist() for r in before.response_ids]
    finally:
        engine.shutdown()
