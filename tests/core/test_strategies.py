"""Exploration strategies: hand-computed examples and hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ngrpo_ray.core.mixing_params import STRATEGIES, MixingParams, SamplingParams
from ngrpo_ray.core.records import noise_from_seeds
from ngrpo_ray.core.strategies import MixState, latent_step_logdensity, mixing_step

MIXING = [s for s in STRATEGIES if s != "sample"]

# Unit vectors; cosine to row 0: row1 0.8, row2 0, row3 -1, row4 0.6 -> C(0) = [0, 1, 4] for k = 3.
E_HAND = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
LOGITS_HAND = torch.tensor([[2.0, 1.0, 0.5, 0.0, 1.0]])


def run(strategy_params, logits, E, temperature=1.0, seed=0, sampling=None, state=None):
    sampling = sampling or SamplingParams(temperature)
    state = state or MixState.create(strategy_params, sampling, logits.shape[0], "cpu", sampling_seed=seed)
    return mixing_step(logits, E, state, torch.Generator().manual_seed(seed)), state


def test_hand_computed_neighbor_mix():
    res, _ = run(MixingParams(rho=1.0, k=3), LOGITS_HAND, E_HAND)
    assert res.mixed.tolist() == [True]
    assert res.tokens.tolist() == [0]  # the anchor (argmax), eq. 12
    assert res.cand_ids.tolist() == [[0, 1, 4]]
    # alpha = softmax([2, 1, 1]) = [e^2, e, e] / (e^2 + 2e)
    #       a0 = e / (e + 2) = 0.576117, a1 = a2 = 1 / (e + 2) = 0.211942
    assert res.alpha[0].tolist() == pytest.approx([0.576117, 0.211942, 0.211942], abs=1e-6)
    # mixed = 0.576117*[1,0] + 0.211942*[0.8,0.6] + 0.211942*[0.6,0.8] = [0.872836, 0.296719]
    assert res.inputs_embeds[0].tolist() == pytest.approx([0.872836, 0.296719], abs=1e-6)
    # logprob of the anchor = 2 - log(e^2 + e + e^0.5 + 1 + e)
    expected_lp = 2 - math.log(math.e**2 + 2 * math.e + math.e**0.5 + 1)
    assert res.logprobs.item() == pytest.approx(expected_lp, abs=1e-6)


def test_hand_computed_tau_and_temperature():
    # tau = None -> sampling temperature 0.5: alpha = softmax([4, 2, 2]) = [e^2, 1, 1] / (e^2 + 2)
    res, _ = run(MixingParams(rho=1.0, k=3), LOGITS_HAND, E_HAND, temperature=0.5)
    a0 = math.e**2 / (math.e**2 + 2)
    assert res.alpha[0].tolist() == pytest.approx([a0, (1 - a0) / 2, (1 - a0) / 2], abs=1e-6)
    # explicit tau = 2 overrides the temperature: softmax([1, 0.5, 0.5])
    res, _ = run(MixingParams(rho=1.0, k=3, tau=2.0), LOGITS_HAND, E_HAND, temperature=0.5)
    a0 = math.e**0.5 / (math.e**0.5 + 2)
    assert res.alpha[0].tolist() == pytest.approx([a0, (1 - a0) / 2, (1 - a0) / 2], abs=1e-6)
    # logprob stays log softmax(logits / T) at T = 0.5
    assert res.logprobs.item() == pytest.approx(4 - math.log(math.e**4 + 2 * math.e**2 + math.e + 1), abs=1e-6)


def test_hand_computed_filtered_probs_alpha():
    # top_k = 2 keeps tokens 0 and 1 (or 4, tie at logit 1): filtered probs over C = [0, 1, 4] renormalised.
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, 0.9]])
    params = MixingParams(rho=1.0, k=3, alpha_source="filtered_probs")
    res, _ = run(params, logits, E_HAND, sampling=SamplingParams(1.0, top_k=2))
    a0 = math.e / (math.e + 1)  # p0 / (p0 + p1) with p4 filtered out
    assert res.alpha[0].tolist() == pytest.approx([a0, 1 - a0, 0.0], abs=1e-6)
    assert res.cand_ids[0].tolist() == [0, 1, 4]


def test_emit_sampled_text_token_with_mixture_input():
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    E = torch.randn(5, 3)
    plain, _ = run(MixingParams(strategy="sample"), logits, E, seed=4)
    res, _ = run(MixingParams(rho=1.0, emit="sampled"), logits, E, seed=4)
    assert torch.equal(res.tokens, plain.tokens)
    assert res.mixed.all()
    assert torch.equal(res.cand_ids[:, 0], logits.argmax(-1))  # the mixture is still around the anchor
    assert not torch.allclose(res.inputs_embeds, plain.inputs_embeds)


def test_gaussian_noise_rebuilds_from_seed():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    E = torch.randn(10, 4)
    res, _ = run(MixingParams(strategy="gaussian_noise", rho=0.5, noise_std=0.3), logits, E, seed=2)
    seeds = res.extras["noise_seed"]
    assert torch.equal(seeds < 0, ~res.mixed) and res.mixed.any() and (~res.mixed).any()
    expected = E[res.tokens] + noise_from_seeds(seeds, 4, 0.3)
    assert torch.equal(res.inputs_embeds, expected)
    g = torch.Generator().manual_seed(int(seeds[res.mixed][0]))
    assert torch.equal(noise_from_seeds(seeds[res.mixed][:1], 4, 0.3)[0], torch.randn(4, generator=g) * 0.3)


def test_gumbel_topk_and_latent_scores_by_hand():
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    E = torch.randn(12, 5)
    logp = torch.log_softmax(logits, -1)
    for strategy in ("gumbel_topk", "latent_gumbel"):
        params = MixingParams(strategy=strategy, rho=1.0, top_k=4, gumbel_tau=0.5)
        res, _ = run(params, logits, E, seed=5)
        top = torch.topk(logp, 4, dim=-1)
        assert torch.equal(res.cand_ids, top.indices)
        scores = res.extras["scores"]
        noise = scores - top.values
        if strategy == "latent_gumbel":  # one-sided: clamp to [-1.5, 3], shift +1.5 -> [0, 4.5]
            assert (noise >= -1e-6).all() and (noise <= 4.5 + 1e-6).all()
            assert torch.allclose(res.extras["latent_logdensity"], latent_step_logdensity(top.values, scores))
        torch.testing.assert_close(res.alpha, torch.softmax(scores / 0.5, -1))
        assert torch.equal(res.tokens, top.indices.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1))
        torch.testing.assert_close(res.inputs_embeds, torch.einsum("bk,bkd->bd", res.alpha, E[res.cand_ids]))


def test_latent_logdensity_hand_value():
    # D = [0, 1]: mean(-0 - 1, -1 - e^-1) = -(2 + e^-1) / 2 = -1.183940
    got = latent_step_logdensity(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.0]]))
    assert got.item() == pytest.approx(-(2 + math.exp(-1)) / 2, abs=1e-6)


def test_soft_thinking_weights_are_renormalised_probs():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    E = torch.randn(8, 4)
    probs = torch.softmax(logits / 0.7, -1)
    res, _ = run(MixingParams(strategy="soft_thinking", rho=1.0, top_k=3), logits, E, temperature=0.7)
    top = torch.topk(probs, 3, -1)
    torch.testing.assert_close(res.alpha, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(res.tokens, logits.argmax(-1))
    full, _ = run(MixingParams(strategy="soft_thinking", rho=1.0, top_k=None), logits, E, temperature=0.7)
    assert full.cand_ids.shape == (3, 8)
    torch.testing.assert_close(full.inputs_embeds, probs @ E)


def test_params_validation_names_the_field():
    with pytest.raises(ValueError, match="mixing.strategy must be one of"):
        MixingParams(strategy="nope")
    with pytest.raises(ValueError, match="mixing.rho"):
        MixingParams(rho=1.5)
    with pytest.raises(ValueError, match="mixing.emit"):
        MixingParams(emit="both")
    with pytest.raises(ValueError, match="mixing.top_k"):
        MixingParams(strategy="gumbel_topk", top_k=None)
    with pytest.raises(ValueError, match="sampling.temperature"):
        SamplingParams(temperature=0.0)


# ---------------------------------------------------------------- properties
logit_batches = st.integers(0, 2**31 - 1).map(
    lambda s: torch.randn(7, 16, generator=torch.Generator().manual_seed(s)) * 3)


@settings(max_examples=25, deadline=None)
@given(logits=logit_batches, k=st.integers(1, 6), tau=st.none() | st.floats(0.05, 5.0),
       temperature=st.floats(0.1, 2.0), strategy=st.sampled_from(MIXING), seed=st.integers(0, 1000))
def test_alpha_is_a_distribution(logits, k, tau, temperature, strategy, seed):
    E = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
    params = MixingParams(strategy=strategy, rho=1.0, k=k, tau=tau, top_k=k)
    res, _ = run(params, logits, E, temperature=temperature, seed=seed)
    assert (res.alpha >= 0).all()
    torch.testing.assert_close(res.alpha.sum(-1), torch.ones(7), atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), strategy=st.sampled_from(MIXING), top_p=st.sampled_from([1.0, 0.9]),
       top_k=st.sampled_from([-1, 5]))
def test_rho_zero_is_plain_sampling_bit_for_bit(seed, strategy, top_p, top_k):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(16, 4, generator=g)
    sp = SamplingParams(0.8, top_p=top_p, top_k=top_k)
    plain_state = MixState.create(MixingParams(strategy="sample"), sp, 5, "cpu", sampling_seed=seed)
    mix_state = MixState.create(MixingParams(strategy=strategy, rho=0.0, top_k=4), sp, 5, "cpu", sampling_seed=seed)
    g_plain, g_mix = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(4):  # several steps: the generators must stay in lockstep
        logits = torch.randn(5, 16, generator=g) * 2
        a = mixing_step(logits, E, plain_state, g_plain)
        b = mixing_step(logits, E, mix_state, g_mix)
        assert not b.mixed.any()
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.inputs_embeds, b.inputs_embeds)
        assert torch.equal(a.logprobs, b.logprobs)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), strategy=st.sampled_from(MIXING))
def test_never_mix_after_stop_id_nor_on_never_mix_anchor(seed, strategy):
    g = torch.Generator().manual_seed(seed)
    B, V, STOP, NEVER = 12, 10, 3, 4
    E = torch.randn(V, 4, generator=g)
    params = MixingParams(strategy=strategy, rho=1.0, top_k=3, stop_after_ids=(STOP,), never_mix_ids=(NEVER,))
    state = MixState.create(params, SamplingParams(1.0), B, "cpu", sampling_seed=seed)
    gen = torch.Generator().manual_seed(seed)
    stopped = torch.zeros(B, dtype=torch.bool)
    for t in range(8):
        logits = torch.randn(B, V, generator=g)
        boost = torch.rand(B, generator=g)
        logits[boost < 0.2, STOP] += 8.0  # some rows make the stop marker the anchor
        logits[boost > 0.8, NEVER] += 8.0  # some rows make the never-mix id the anchor
        res = mixing_step(logits, E, state, gen)
        assert not (res.mixed & stopped).any()  # nothing mixed after a stop marker was emitted
        # With emit="anchor" a mixed row's text token is its anchor (argmax logits for neighbor_mix/soft_thinking,
        # argmax perturbed scores for the Gumbel ones, the sampled token for gaussian_noise).
        assert not (res.mixed & ((res.tokens == NEVER) | (res.tokens == STOP))).any()
        anchor = logits.argmax(-1)
        # unstopped rows with an ordinary anchor do mix at rho = 1 (for gumbel strategies "anchor" = argmax scores)
        if strategy in ("neighbor_mix", "soft_thinking"):
            ordinary = ~stopped & (anchor != NEVER) & (anchor != STOP)
            assert torch.equal(res.mixed, ordinary)
        stopped |= res.tokens == STOP


@pytest.mark.parametrize("rho", [0.1, 0.5])
def test_mixed_fraction_matches_rho(rho):
    n = 20_000
    logits = torch.randn(n, 32, generator=torch.Generator().manual_seed(8))
    E = torch.randn(32, 4)
    res, _ = run(MixingParams(rho=rho), logits, E, seed=9)
    se = math.sqrt(rho * (1 - rho) / n)
    assert abs(res.mixed.float().mean().item() - rho) < 3 * se
