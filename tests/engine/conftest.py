"""Engine test fixtures: tiny random checkpoints written once per session, vLLM engines built once per session
(engine start costs ~20-30 s on a 2-core machine). Every engine test is marked ``engine``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # tests reseed workers with a callable RPC

from tiny_models import EOS_ID, write_tiny_model  # noqa: E402

KV_GIB = 0.125
QWEN2_BLOCKS = 24  # x 32 tokens: small enough that a 48 x 100-token batch is preempted


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: builds a real vLLM engine (slow: ~25 s per engine start)")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: str(write_tiny_model(root / family, family, seed=1)) for family in ("qwen2", "llama")}


def _build(model: str, hooked: bool = True, **kw):
    from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm

    from vllm import SamplingParams

    spec = EngineSpec(model=model, seed=0, max_model_len=256, max_num_seqs=64, kv_cache_gib=KV_GIB, **kw)
    llm = build_llm(spec, hooked=hooked)
    # One throwaway call: the first generate of an engine with stats on draws from the global RNG differently,
    # which would break the seeded comparisons.
    llm.generate([{"prompt_token_ids": [2, 3]}], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
    return llm


@pytest.fixture(scope="session")
def qwen2_engine(tiny_models):
    llm = _build(tiny_models["qwen2"], num_gpu_blocks_override=QWEN2_BLOCKS)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def llama_engine(tiny_models):
    llm = _build(tiny_models["llama"])
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def vanilla_qwen2_engine(tiny_models):
    llm = _build(tiny_models["qwen2"], hooked=False, num_gpu_blocks_override=QWEN2_BLOCKS)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def eos_id() -> int:
    return EOS_ID


def engine_for(request, family: str):
    return request.getfixturevalue(f"{family}_engine")


def reseed(llm, seed: int) -> None:
    """Reseed torch's global RNG in every worker (vLLM's sampler draws from it when requests carry no seed)."""
    def _seed(worker, s):
        import torch

        torch.manual_seed(s)
        return True

    llm.collective_rpc(_seed, args=(seed,))


def preemptions(llm) -> int:
    """Rows the hook saw come back after missing steps (preempted, then recomputed)."""
    from ngrpo_ray.engine.records_client import check

    return int(check(llm.collective_rpc("ngrpo_stats"))["resumed_rows"])
