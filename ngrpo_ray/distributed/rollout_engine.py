"""RolloutEngine: a Ray actor that owns one hooked vLLM ``LLM``.

``generate`` returns a RolloutBatch; called as ``engine.generate.remote(...)`` the caller holds an ObjectRef and the
tensors go through Ray's object store. Several engines run side by side (data parallel); each claims
``num_cpus`` (fractional allowed) / ``num_gpus`` from Ray via ``RolloutEngine.options(...)`` or ``make_rollout_engine``.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from typing import Any

import ray


class StalePolicyVersion(ValueError):
    """`generate` asked for a policy version the engine does not hold (e.g. Ray restarted it: initial model)."""


class RolloutEngineImpl:
    """The actor body (also usable without Ray, e.g. in a single-process script)."""

    def __init__(self, spec: dict[str, Any], policy_version: int = 0):
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm, load_tokenizer
        from ngrpo_ray.engine.rollout import stop_ids_of

        self.spec = EngineSpec(**spec)
        t0 = time.perf_counter()
        # None: a checkpoint without a tokenizer (text stays empty; build_llm then needs spec.neighbor_ids)
        self.tokenizer = load_tokenizer(self.spec.model)
        self.llm = build_llm(self.spec, hooked=True, tokenizer=self.tokenizer, sole_engine=_in_ray_actor())
        self.start_seconds = time.perf_counter() - t0
        self.stop_ids = stop_ids_of(self.spec.model)
        self.policy_version = int(policy_version)
        self.incarnation = uuid.uuid4().hex  # new on every (re)start: lets the driver see a restart it missed
        self.sleeping: set[str] = set()  # sleep-mode tags ("weights", "kv_cache") whose GPU memory is released

    def generate(self, prompt_token_ids: list[list[int]], sampling: Any, mixing: Any,
                 policy_version: int | None = None, group_size: int = 1, stream: dict | None = None):
        from ngrpo_ray.engine.rollout import generate_rollout

        self._check_awake("generate")
        version = self.policy_version if policy_version is None else int(policy_version)
        if version != self.policy_version:
            raise StalePolicyVersion(f"generate asked for policy version {version}, the engine holds {self.policy_version}")
        return generate_rollout(self.llm, prompt_token_ids, sampling, mixing, policy_version=version,
                                group_size=group_size, stop_token_ids=self.stop_ids, tokenizer=self.tokenizer,
                                stream=stream)

    def refit_from_path(self, path: str, policy_version: int) -> dict:
        from ngrpo_ray.engine.records_client import check

        self._check_awake("refit")
        stats = check(self.llm.collective_rpc("ngrpo_refit_from_path", args=(str(path),)))
        self.llm.reset_prefix_cache()  # cached blocks were computed with the old weights
        self.policy_version = int(policy_version)
        return stats

    def refit_from_state_dict(self, state: dict, policy_version: int) -> dict:
        """Through a temporary safetensors file next to the engine (the engine core may be another process)."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="ngrpo_refit_") as tmp:
            path = os.path.join(tmp, "model.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
            return self.refit_from_path(path, policy_version)

    def sleep(self) -> dict:
        """Colocated on GPU: free this GPU's engine memory for the trainer's update (vLLM sleep mode level 1: weights
        offloaded to CPU, KV cache dropped). Without sleep mode (CPU) a no-op that says so."""
        if not self.spec.enable_sleep_mode:
            return {"slept": False, "reason": "sleep mode is off (vLLM's sleep mode needs CUDA)"}
        t0 = time.perf_counter()
        self.llm.sleep(level=1)
        self.sleeping = {"weights", "kv_cache"}
        return {"slept": True, "seconds": time.perf_counter() - t0}

    def wake_up(self, tags: list[str] | None = None) -> dict:
        """Reallocate what sleep released: ``tags`` of "weights" and "kv_cache", or all of it. The weight sync wakes
        the weights, loads, then wakes the KV cache, so the load's buffers never sit beside the KV cache (verl's
        order); vLLM resumes scheduling once both are back. A no-op on an engine that is awake (e.g. restarted)."""
        if not self.spec.enable_sleep_mode:
            return {"woke": False}
        want = sorted(self.sleeping.intersection(tags) if tags else self.sleeping)
        if not want:
            return {"woke": False, "awake": True}
        t0 = time.perf_counter()
        self.llm.wake_up(tags=want)
        self.sleeping.difference_update(want)
        if "kv_cache" in want:
            self.llm.reset_prefix_cache()  # the KV cache was dropped while asleep
        return {"woke": True, "tags": want, "awake": not self.sleeping, "seconds": time.perf_counter() - t0}

    def _check_awake(self, what: str) -> None:
        if self.sleeping:
            raise RuntimeError(f"{what} on a sleeping engine (released: {sorted(self.sleeping)}): wake_up first")

    def health(self) -> dict:
        from ngrpo_ray.engine.records_client import check

        if "weights" in self.sleeping:
            # the hook's counters live in the weights' memory pool, which sleep released: reading them would touch
            # unmapped device memory (an illegal address that poisons the engine's CUDA context)
            stats = {"asleep": sorted(self.sleeping)}
        else:
            stats = check(self.llm.collective_rpc("ngrpo_stats", timeout=60))
        return {"ok": True, "policy_version": self.policy_version, "model": self.spec.model,
                "incarnation": self.incarnation, "engine_pid": os.getpid(), "engine_core": self._engine_core_kind(),
                "start_seconds": self.start_seconds, "kv_cache_tokens": self._kv_cache_tokens(),
                **{k: v for k, v in stats.items() if k != "ok"}}

    def _kv_cache_tokens(self) -> int | None:
        """The tokens vLLM's KV cache holds (what its reservation left after the weights and its profile run)."""
        engine = getattr(self.llm, "llm_engine", None)
        tokens = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
        tokens = getattr(tokens, "kv_cache_size_tokens", None)
        return None if tokens is None else int(tokens)

    def _engine_core_kind(self) -> str | None:
        """vLLM's client class: InprocClient when the engine core runs in this actor (build_llm's sole_engine)."""
        engine = getattr(self.llm, "llm_engine", None)
        return None if engine is None else type(engine.engine_core).__name__

    def shutdown(self) -> bool:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        return True


def _in_ray_actor() -> bool:
    """Inside a Ray actor: the process hosts this one engine (llm_factory.build_llm's ``sole_engine``)."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


RolloutEngine = ray.remote(RolloutEngineImpl)


def make_rollout_engine(spec: dict[str, Any], num_cpus: float = 1.0, num_gpus: float = 0.0,
                        policy_version: int = 0, name: str | None = None):
    """A RolloutEngine actor handle with its resource claim (fractional CPUs allowed)."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if name is not None:
        options["name"] = name
    return RolloutEngine.options(**options).remote(spec, policy_version)
