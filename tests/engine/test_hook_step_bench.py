"""`ngrpo bench hook-step` mechanics, and the hook's records on vLLM's real Sampler without an engine: at temperature
1 the anchor logprob is derived from vLLM's logprob of the drawn token (no vocabulary pass) and must equal
log_softmax(logits)[anchor]; at 0.7 it comes from the hook's own normaliser. A few seconds, no engine."""

from __future__ import annotations

import math

import pytest
import torch

from ngrpo_ray.bench import hook_step as hs
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE


def test_bench_reports_ratios_per_row_count():
    out = hs.run_hook_step_bench({"rows": (4, 16), "vocab": 2048, "steps": 3, "warmup": 1, "rho": 0.5},
                                 log=lambda msg: None)
    assert set(out) >= {"ratio_4", "ratio_16", "per_rows", "device"}
    for r in out["per_rows"]:
        assert r["ratio"] == pytest.approx(r["hook_ms"] / r["sampler_ms"])
        assert r["hook_ms"] > 0 and r["sampler_ms"] > 0
        assert r["steps_reusing_vllm_logprob"] == 4  # temperature 1: vLLM's logprob is reused every step
    assert 0.2 < out["per_rows"][1]["mixed_fraction"] < 0.8


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_records_follow_the_contract_on_vllms_sampler(temperature):
    a = dict(hs.DEFAULTS, vocab=4096, k=3, rho=0.6, temperature=temperature)
    B, dev = 32, torch.device("cpu")
    sampler, md = hs._sampler_and_metadata(B, temperature, dev)
    hook = hs._hook(sampler, B, a, dev)
    logits = torch.randn(B, a["vocab"], generator=torch.Generator().manual_seed(3)) * 3.0
    ref = logits.clone()
    hook._pre_hook(sampler, (), {"logits": logits})
    out = sampler(logits=logits, sampling_metadata=md)
    hook._post_hook(sampler, (), {}, out)
    ids = out.sampled_token_ids[:, 0].long()
    mixed = ids >= VIRTUAL_BASE
    assert 5 <= int(mixed.sum()) <= 30
    z = ref / temperature
    logp = torch.log_softmax(z, dim=-1)
    emb = hook.embedding
    for row in mixed.nonzero().flatten().tolist():
        slot = int(ids[row]) - VIRTUAL_BASE
        anchor = int(z[row].argmax())
        cand = emb.ngrpo_cand[slot]
        assert int(emb.ngrpo_ids[slot]) == int(ids[row]) and int(cand[0]) == anchor
        assert float(hook.record_logprob[slot]) == pytest.approx(float(logp[row, anchor]), abs=2e-5)
        assert float(out.logprobs_tensors.logprobs[row, 0]) == pytest.approx(float(logp[row, anchor]), abs=2e-5)
        want_alpha = torch.softmax(ref[row, cand] / temperature, dim=-1)
        assert torch.allclose(emb.ngrpo_alpha[slot], want_alpha, atol=1e-6)
    for row in (~mixed).nonzero().flatten().tolist():  # unmixed rows: the contract's logprob of the drawn token
        lp = float(out.logprobs_tensors.logprobs[row, 0])
        assert lp == pytest.approx(float(logp[row, int(ids[row])]), abs=2e-5) and not math.isnan(lp)
