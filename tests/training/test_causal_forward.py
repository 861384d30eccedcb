"""The trainer's forward runs without a padding mask: right padding under the causal mask changes nothing that is
read, so the log-probs are bit-identical to the masked forward, the gradients equal to fp32 rounding (SDPA's causal
and masked backward kernels sum in different orders: 3.6e-7 of the largest entry at most), and no [B, 1, L, L] mask
is built.

A tiny Qwen2 (SDPA attention, as HF picks by default) on a ragged batch. The reference is the same
``response_logprobs`` call with HF's padding mask and the cumulative positions put back into the decoder's forward
(what the trainer ran before). Memory: torch's profiler timeline (CPU allocations made during the call, tensors that
existed before excluded); the masked forward's transient peak exceeds the causal one by more than the bool mask.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ngrpo_ray.training.logprobs import causal_positions, response_logprobs
from tests.support.memory_timeline import transient_peak_bytes
from tests.support.padding_mask import PaddingMaskForward
from tests.support.ragged_batch import ragged_batch

V, TEMP = 512, 0.7
PROMPTS, RESPONSES = (5, 9, 3, 7), (300, 120, 41, 250)  # rows of 305, 129, 44 and 257 tokens: three are padded


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).float().eval()


def _batch():
    return ragged_batch(PROMPTS, RESPONSES, V, mixed_fraction=0.3)


def test_positions_count_through_the_padding():
    ids = torch.zeros(2, 4, dtype=torch.long)
    assert causal_positions(ids).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_log_probs_bit_identical_to_the_padding_masked_forward():
    model, (prompts, records) = _model(), _batch()
    with torch.no_grad():
        causal = response_logprobs(model, prompts, records, TEMP, chunk_tokens=128)
        with PaddingMaskForward(model.model, prompts, records):
            masked = response_logprobs(model, prompts, records, TEMP, chunk_tokens=128)
    assert torch.equal(causal.mask, masked.mask)
    assert int(causal.mask.sum()) == sum(RESPONSES)
    assert torch.equal(causal.logp, masked.logp)  # bit for bit, mixed steps included


def test_gradients_equal_to_rounding_to_the_padding_masked_forward():
    prompts, records = _batch()
    grads = []
    for masked in (False, True):
        model = _model().train()
        with PaddingMaskForward(model.model, prompts, records) if masked else contextlib.nullcontext():
            tb = response_logprobs(model, prompts, records, TEMP, chunk_tokens=128)
            (tb.logp * tb.mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for causal, masked in zip(*grads):
        assert (causal - masked).abs().max() <= 1e-6 * masked.abs().max()
    assert sum(torch.equal(a, b) for a, b in zip(*grads)) >= 8  # the head, the last MLP and norms: bit for bit


@pytest.mark.filterwarnings("ignore")
def test_no_square_mask_is_built():
    model, (prompts, records) = _model(), _batch()
    B, L = len(records), max(int(p.numel()) + len(r) for p, r in zip(prompts, records))
    with torch.no_grad():
        response_logprobs(model, prompts, records, TEMP, chunk_tokens=128)  # warm-up
        causal = transient_peak_bytes(lambda: response_logprobs(model, prompts, records, TEMP, chunk_tokens=128))
        with PaddingMaskForward(model.model, prompts, records):
            masked = transient_peak_bytes(lambda: response_logprobs(model, prompts, records, TEMP,
                                                                     chunk_tokens=128))
    # the bool [B, 1, L, L] mask alone is B x L^2 bytes (371 kB here); SDPA adds its float bias on top
    assert masked - causal > B * L * L, (masked, causal, B * L * L)
