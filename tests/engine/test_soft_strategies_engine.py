"""The other exploration strategies inside the vLLM engine (issue 15, build item 1), each checked like neighbor
mixing (test_exactness): teacher-forcing the recorded responses and mixtures through the HF model, the core's own
strategy step (core.strategies, the reference generator's) replayed at every step of every response on the forced
logits, with the response's stream, decides the same gate, the same candidates (exactly), the same weights (1e-5)
and the same text token; every rollout logprob equals the forced one (1e-4); a control fed plain token embeddings
differs.

One engine (tiny random Llama, ring width 8, full neighbor table) serves every strategy through per-request
options: gumbel_topk, latent_gumbel, soft_thinking, and neighbor_mix with the released code's filtered-probability
alpha and sampled text token. The last test runs them all under the no-host-read guard.
"""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
from ngrpo_ray.core.neighbors import build_neighbor_table, valid_row_mask
from ngrpo_ray.core.strategies import MixState, mixing_step
from ngrpo_ray.engine.records_client import check
from ngrpo_ray.engine.rollout import generate_rollout

from conftest import _build
from hf_oracle import control_max_gap, load_hf, teacher_forced_logits
from tiny_models import EOS_ID

PROMPTS = [[(7 * i + j) % 300 + 2 for j in range(3 + i % 4)] for i in range(8)]
VERSION = 5
SEED = 11
WIDTH = 8
CASES = {
    "gumbel_topk": (MixingParams(strategy="gumbel_topk", rho=0.5, top_k=6, gumbel_tau=0.7, seed=SEED),
                    {"temperature": 0.8}),
    "latent_gumbel": (MixingParams(strategy="latent_gumbel", rho=1.0, top_k=8, noise_scale=0.5, seed=SEED),
                      {"temperature": 1.0}),
    "soft_thinking": (MixingParams(strategy="soft_thinking", rho=1.0, top_k=5, seed=SEED), {"temperature": 0.6}),
    "released_code": (MixingParams(strategy="neighbor_mix", rho=0.5, k=3, alpha_source="filtered_probs",
                                   emit="sampled", seed=SEED), {"temperature": 0.8, "top_p": 0.9, "top_k": 40}),
}


@pytest.fixture(scope="module")
def strategy_engine(tiny_models):
    llm = _build(tiny_models["llama"], k_max=WIDTH, neighbor_mode="full")
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def hf_llama(tiny_models):
    return load_hf(tiny_models["llama"])


def _rollout(llm, name: str, max_tokens: int = 24, group_size: int = 2):
    params, sampling = CASES[name]
    return generate_rollout(llm, PROMPTS, {**sampling, "max_tokens": max_tokens}, params, policy_version=VERSION,
                            group_size=group_size, stop_token_ids=[EOS_ID])


def _replay(model, batch, name: str) -> dict:
    """Asserts the exactness contract against the core's strategy step; returns counts."""
    params, sampling = CASES[name]
    sp = SamplingParams(sampling["temperature"], sampling.get("top_p", 1.0), sampling.get("top_k", -1))
    replay_params = MixingParams(**{**params.__dict__, "emit": "anchor", "never_mix_ids": (EOS_ID,)})
    E = model.get_input_embeddings().weight.detach()
    table = build_neighbor_table(E, params.k, metric="cosine", valid=valid_row_mask(E.shape[0], exclude=[EOS_ID]))
    forced = teacher_forced_logits(model, batch)
    counts = {"mixed": 0, "sampled_not_anchor": 0, "filtered_out": 0}
    for b, logits in enumerate(forced):
        resp, mixed = batch.response_ids[b], batch.mixed_mask[b]
        logp = torch.log_softmax(logits / sp.temperature, dim=-1)
        torch.testing.assert_close(batch.logprobs[b], logp.gather(1, resp.unsqueeze(1)).squeeze(1), atol=1e-4, rtol=0)
        for t in range(len(resp)):
            state = MixState.create(replay_params, sp, 1, "cpu", call=VERSION, first_index=b, table=table)
            state.step = t  # the response's stream at its step t
            res = mixing_step(logits[t : t + 1], E, state, torch.Generator().manual_seed(0))
            if not bool(mixed[t]):
                if params.emit == "anchor":
                    assert not bool(res.mixed[0]), (name, b, t)
                continue
            assert bool(res.mixed[0]), (name, b, t)
            assert batch.cand_ids[b][t].tolist() == res.cand_ids[0].tolist(), (name, b, t)
            torch.testing.assert_close(batch.alpha[b][t], res.alpha[0], atol=1e-5, rtol=0)
            if params.emit == "anchor":
                assert int(resp[t]) == int(res.tokens[0]), (name, b, t)
            else:
                counts["sampled_not_anchor"] += int(int(resp[t]) != int(logits[t].argmax()))
                assert int(resp[t]) != EOS_ID
            counts["filtered_out"] += int((batch.alpha[b][t][: params.k] == 0).any())
            counts["mixed"] += 1
    return counts


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_strategy_rollout_is_the_core_step_replayed(strategy_engine, hf_llama, name):
    batch = _rollout(strategy_engine, name)
    params, sampling = CASES[name]
    width = params.record_width(10**6)
    assert all(c.shape[1] == width for c in batch.cand_ids)
    counts = _replay(hf_llama, batch, name)
    steps = sum(len(r) for r in batch.response_ids)
    assert counts["mixed"] >= (0.3 if params.rho < 1 else 0.8) * steps, (counts, steps)
    if name == "released_code":
        assert counts["sampled_not_anchor"] >= 10, counts  # the text token is the sampled one, not the anchor
        assert counts["filtered_out"] >= 5, counts  # top-k / top-p dropped a neighbor: the filtered alpha acted
    assert control_max_gap(hf_llama, batch, sampling["temperature"]) > 1e-2


@pytest.mark.engine
@pytest.mark.slow
def test_new_strategies_read_no_tensor_value(strategy_engine):
    from test_gate_streams import _guard_report, _install_guard

    for name in CASES:  # warm-up outside the guard
        _rollout(strategy_engine, name, max_tokens=4)
    strategy_engine.collective_rpc(_install_guard)
    mixed = 0
    for name in CASES:
        for temperature in (1.0, 0.8):  # vLLM's logprob reused / the contract's computed
            params, sampling = CASES[name]
            batch = generate_rollout(strategy_engine, PROMPTS[:4], {**sampling, "temperature": temperature,
                                                                    "max_tokens": 12}, params, group_size=2,
                                     stop_token_ids=[EOS_ID])
            mixed += sum(int(m.sum()) for m in batch.mixed_mask)
    report = strategy_engine.collective_rpc(_guard_report)[0]
    check(strategy_engine.collective_rpc("ngrpo_install", kwargs={"seed": 0, "neighbor_mode": "full"}))
    assert report["violations"] == [], report["first_stack"]
    assert report["calls"] > 500 and mixed > 50, (report["calls"], mixed)
