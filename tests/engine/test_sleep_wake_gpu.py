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


class FakeSleepModeLLM:
    """Stands in for vLLM's LLM where sleep mode cannot exist (it needs CUDA): records what the engine asks of it."""

    def __init__(self):
        self.calls: list[tuple] = []

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.calls.append(("wake_up", tags))
        return True

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    def collective_rpc(self, method: str, args: tuple = (), timeout: float | None = None) -> list[dict]:
        self.calls.append((method,))
        return [{"ok": True, "neighbor_version": 3}]


def _sleep_mode_engine():
    from ngrpo_ray.distributed.rollout_engine import RolloutEngineImpl
    from ngrpo_ray.engine.llm_factory import EngineSpec

    engine = RolloutEngineImpl.__new__(RolloutEngineImpl)  # the bookkeeping only: no vLLM engine is built
    engine.spec = EngineSpec(model="unused", enable_sleep_mode=True)
    engine.llm, engine.sleeping = FakeSleepModeLLM(), set()
    engine.policy_version, engine.incarnation, engine.start_seconds = 0, "i0", 0.0
    return engine


def test_asleep_engine_reads_nothing_from_gpu_and_wakes_weights_before_kv_cache():
    engine = _sleep_mode_engine()
    assert engine.health()["neighbor_version"] == 3  # awake: the hook's counters are read
    engine.sleep()
    engine.llm.calls.clear()
    health = engine.health()  # asleep: the counters live in the released weights pool
    assert health["asleep"] == ["kv_cache", "weights"] and health["incarnation"] == "i0"
    assert engine.llm.calls == []
    with pytest.raises(RuntimeError, match="generate on a sleeping engine"):
        engine.generate([[1, 2]], {}, MixingParams(rho=0.0))
    assert engine.wake_up(["weights"]) == {"woke": True, "tags": ["weights"], "awake": False,
                                           "seconds": pytest.approx(0.0, abs=1.0)}
    assert engine.llm.calls == [("wake_up", ["weights"])]  # no prefix-cache reset: the KV cache is still away
    assert engine.health()["neighbor_version"] == 3  # weights back: the counters can be read again
    assert engine.wake_up(["kv_cache"])["awake"]
    assert engine.llm.calls[-2:] == [("wake_up", ["kv_cache"]), ("reset_prefix_cache",)]
    assert engine.wake_up() == {"woke": False, "awake": True}  # awake (say, just restarted): vLLM is not called
    assert engine.wake_up(["weights"]) == {"woke": False, "awake": True}


class FakeColocatedFleet:
    """The fleet's sleep-mode calls, recorded (its engines' sleep mode needs CUDA)."""

    def __init__(self, calls: list):
        self.calls, self.engines, self.serving_version = calls, ["e0"], 0

    def find_restarted(self) -> list[int]:
        self.calls.append("find_restarted")
        return []

    def wake_up(self, tags=None) -> list[dict]:
        self.calls.append(("wake_up", tags))
        return []


class FakeTrainerGroup:
    def __init__(self, calls: list):
        self.calls = calls

    def start_sync(self, version: int) -> str:
        self.calls.append(("sync", version))
        return "ref"

    def wait(self, ref: str, timeout_s: float) -> list[dict]:
        return [{"engines": []}]


def test_colocated_sync_wakes_weights_then_loads_then_wakes_kv_cache():
    from ngrpo_ray.config import load_config
    from ngrpo_ray.distributed.placement import plan_placement
    from ngrpo_ray.distributed.policy_sync import PolicySync

    cfg = load_config(None, ["trainer.use_gpu=true", "trainer.num_workers=4", "rollout.num_engines=2",
                             "rollout.engine_cpus=2", "cluster.placement=colocated"])
    plan = plan_placement(cfg)
    assert plan.sleep_engines
    calls: list = []
    PolicySync(cfg, plan, FakeTrainerGroup(calls), FakeColocatedFleet(calls), log=calls.append).sync_weights(5)
    assert calls == ["find_restarted", ("wake_up", ["weights"]), ("sync", 5), ("wake_up", ["kv_cache"])]


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
        assert engine.health()["asleep"] == ["kv_cache", "weights"]  # nothing read from the released memory
        assert not engine.wake_up(["weights"])["awake"]  # the sync's order: weights, the load, then the KV cache
        assert engine.health()["neighbor_version"] >= 0  # the hook's counters are readable again
        assert engine.wake_up(["kv_cache"])["awake"]
        engine.refit_from_state_dict(model.state_dict(), 1)
        after = engine.generate(prompts, greedy, MixingParams(rho=0.0), 1)
        assert [r.tolist() for r in after.response_ids] != [r.tolist() for r in before.response_ids]
    finally:
        engine.shutdown()
