"""Done-when 2: exactness under forced preemption (KV cache too small for the batch) and after a weight refit
(logprobs then match the new weights, and the neighbor table was rebuilt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.records_client import check
from ngrpo_ray.engine.rollout import generate_rollout

from conftest import preemptions
from hf_oracle import load_hf
from test_exactness import TEMPERATURE, check_batch_against_hf


@pytest.mark.engine
def test_exact_under_forced_preemption(qwen2_engine, tiny_models):
    before = preemptions(qwen2_engine)
    prompts = [[(13 * i + j) % 300 + 2 for j in range(4)] for i in range(48)]
    batch = generate_rollout(qwen2_engine, prompts, {"temperature": TEMPERATURE, "max_tokens": 100,
                                                     "ignore_eos": True}, MixingParams(rho=0.5, k=3))
    assert preemptions(qwen2_engine) > before  # 48 x 104 tokens do not fit 24 blocks of 32
    counts = check_batch_against_hf(load_hf(tiny_models["qwen2"]), batch, k=3, tau=TEMPERATURE)
    assert counts["mixed"] > 1000


@pytest.mark.engine
def test_exact_after_refit_and_neighbors_rebuilt(qwen2_engine, tiny_models, tmp_path):
    from safetensors.torch import save_file

    original = tiny_models["qwen2"]
    model = load_hf(original)
    anchors = list(range(2, 300))
    rows_before = check(qwen2_engine.collective_rpc("ngrpo_neighbor_rows", args=(anchors,)))
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    new_path = tmp_path / "new.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(new_path))
    try:
        check(qwen2_engine.collective_rpc("ngrpo_refit_from_path", args=(str(new_path),)))
        qwen2_engine.reset_prefix_cache()
        rows_after = check(qwen2_engine.collective_rpc("ngrpo_neighbor_rows", args=(anchors,)))
        assert rows_after["version"] == rows_before["version"] + 1
        assert rows_after["rows"] != rows_before["rows"]
        prompts = [[(17 * i + j) % 300 + 2 for j in range(4)] for i in range(8)]
        batch = generate_rollout(qwen2_engine, prompts, {"temperature": TEMPERATURE, "max_tokens": 24},
                                 MixingParams(rho=0.5, k=3), stop_token_ids=[1])
        counts = check_batch_against_hf(model, batch, k=3, tau=TEMPERATURE)  # the NEW weights
        assert counts["mixed"] >= 20
        old_model = load_hf(original)
        with pytest.raises(AssertionError):  # and not the old ones
            check_batch_against_hf(old_model, batch, k=3, tau=TEMPERATURE)
    finally:  # the session engine goes back to the original weights
        check(qwen2_engine.collective_rpc("ngrpo_refit_from_path", args=(str(Path(original) / "model.safetensors"),)))
        qwen2_engine.reset_prefix_cache()
    assert check(qwen2_engine.collective_rpc("ngrpo_neighbor_rows", args=(anchors,)))["rows"] == rows_before["rows"]
