"""The reference generator's records rebuild its inputs: a teacher-forced forward gives the generation logits."""

import time

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
from ngrpo_ray.core.records import align_records, noise_from_seeds, rebuild_inputs_embeds
from ngrpo_ray.core.reference_generator import generate

EOS = 2


def teacher_forced_diffs(model, prompts, records, noise_std=None):
    """Max |logits diff| of the rebuilt-input forward and of a plain-token control vs the generation logits,
    and the max |logprob diff| of the rebuilt forward vs the recorded logprobs."""
    E = model.get_input_embeddings().weight
    a = align_records(prompts, records, pad_id=0)
    noise = None
    if a.noise_seed is not None:
        noise = noise_from_seeds(a.noise_seed, E.shape[1], noise_std)
    embeds = rebuild_inputs_embeds(a.input_ids, E, a.mixed_mask, a.cand_ids, a.alpha, noise=noise)
    with torch.no_grad():
        rebuilt = model(inputs_embeds=embeds, attention_mask=a.attention_mask, position_ids=a.position_ids).logits
        control = model(inputs_embeds=E[a.input_ids], attention_mask=a.attention_mask,
                        position_ids=a.position_ids).logits
    d_rebuilt = d_control = d_logprob = 0.0
    for b, (p, r) in enumerate(zip(prompts, records)):
        P, T = len(p), len(r)
        got = rebuilt[b, P - 1 : P - 1 + T]  # logits at the position before token t predict token t
        d_rebuilt = max(d_rebuilt, (got - r.step_logits).abs().max().item())
        d_control = max(d_control, (control[b, P - 1 : P - 1 + T] - r.step_logits).abs().max().item())
        lp = torch.log_softmax(got / 0.7, -1).gather(1, r.response_ids.unsqueeze(1)).squeeze(1)
        d_logprob = max(d_logprob, (lp - r.logprobs).abs().max().item())
    return d_rebuilt, d_control, d_logprob


@pytest.mark.parametrize("model_name", ["tiny_qwen2", "tiny_llama"])
@pytest.mark.parametrize("strategy,noise_std", [("neighbor_mix", None), ("gaussian_noise", 0.5),
                                                ("gumbel_topk", None)])
def test_reconstruction_reproduces_generation_logits(request, model_name, strategy, noise_std, prompts):
    model = request.getfixturevalue(model_name)
    params = MixingParams(strategy=strategy, rho=0.5, k=3, top_k=3, noise_std=noise_std or 0.1)
    records = generate(model, prompts, params, SamplingParams(0.7), max_new_tokens=24, seed=11, eos_ids=(EOS,),
                       return_logits=True)
    n_mixed = sum(int(r.mixed_mask[:-1].sum()) for r in records)  # mixed AND fed back
    assert n_mixed > 20
    d_rebuilt, d_control, d_logprob = teacher_forced_diffs(model, prompts, records, noise_std)
    assert d_rebuilt < 1e-5
    assert d_logprob < 1e-5
    assert d_control > 1e-3  # feeding plain anchor tokens instead of the recorded mixtures is visibly different


def test_rho_zero_generation_equals_plain_sampling(tiny_qwen2, prompts):
    sp = SamplingParams(0.9, top_p=0.95)
    plain = generate(tiny_qwen2, prompts, MixingParams(strategy="sample"), sp, 16, seed=5, eos_ids=(EOS,))
    mix0 = generate(tiny_qwen2, prompts, MixingParams(rho=0.0), sp, 16, seed=5, eos_ids=(EOS,))
    for a, b in zip(plain, mix0):
        assert torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.logprobs, b.logprobs)
        assert not b.mixed_mask.any()


def test_stops_at_eos_and_stop_after_marker(tiny_qwen2, prompts):
    # Use the most frequent generated token as the "</think>" marker and as EOS in two runs.
    sp = SamplingParams(1.0)
    free = generate(tiny_qwen2, prompts, MixingParams(rho=1.0), sp, 20, seed=3)
    marker = int(torch.cat([r.response_ids for r in free]).bincount().argmax())
    recs = generate(tiny_qwen2, prompts, MixingParams(rho=1.0, stop_after_ids=(marker,)), sp, 20, seed=3)
    hit = 0
    for r in recs:
        where = (r.response_ids == marker).nonzero().flatten()
        if where.numel():
            hit += 1
            assert not r.mixed_mask[where[0]:].any()
    assert hit > 0
    eos_recs = generate(tiny_qwen2, prompts, MixingParams(rho=1.0), sp, 20, seed=3, eos_ids=(marker,))
    for r, f in zip(eos_recs, free):
        if (f.response_ids == marker).any():
            assert r.stop_reason == "eos" and int(r.response_ids[-1]) == marker
            assert (r.response_ids[:-1] != marker).all()
            assert torch.equal(r.response_ids, f.response_ids[: len(r)])  # same run, only cut
        else:
            assert r.stop_reason == "length" and len(r) == 20


def test_generation_is_fast_and_seeded(tiny_qwen2, prompts):
    params = MixingParams(rho=0.5)
    t0 = time.perf_counter()
    a = generate(tiny_qwen2, prompts, params, SamplingParams(0.7), 32, seed=1)
    seconds = time.perf_counter() - t0
    b = generate(tiny_qwen2, prompts, params, SamplingParams(0.7), 32, seed=1)
    c = generate(tiny_qwen2, prompts, params, SamplingParams(0.7), 32, seed=2)
    assert all(torch.equal(x.response_ids, y.response_ids) and torch.equal(x.alpha, y.alpha) for x, y in zip(a, b))
    assert any(not torch.equal(x.response_ids, y.response_ids) for x, y in zip(a, c))
    assert len(a) == 8 and all(len(r) == 32 for r in a)
    assert seconds < 10.0, seconds  # B=8, 32 steps: well under a second unloaded


def test_neighbors_are_valid_rows_in_fp32_for_a_bf16_model(tiny_qwen2, prompts):
    # ids 0..55 are the "tokenizer's", rows 56..63 padding; EOS never mixes, so it is never a neighbor either.
    import copy

    from ngrpo_ray.core.neighbors import valid_row_mask

    model = copy.deepcopy(tiny_qwen2).bfloat16()
    valid = valid_row_mask(64, 56, exclude=[EOS])
    params = MixingParams(rho=1.0, k=3, never_mix_ids=(EOS,))
    records = generate(model, prompts, params, SamplingParams(0.7), max_new_tokens=16, seed=3, eos_ids=(EOS,),
                       valid=valid)
    E = model.get_input_embeddings().weight.detach().double()  # the bf16 values, exactly
    En = E / E.norm(dim=1, keepdim=True)
    rows = torch.cat([r.cand_ids[r.mixed_mask] for r in records])
    assert len(rows) > 50
    for row in rows.tolist():
        anchor = row[0]
        if not valid[anchor]:  # argmax on a padding row: the mixture is the anchor itself
            assert row == [anchor] * 3
            continue
        s = En[anchor] @ En.T
        s[~valid] = float("-inf")
        s[anchor] = float("-inf")
        assert row[1:] == torch.sort(s, descending=True, stable=True).indices[:2].tolist()
