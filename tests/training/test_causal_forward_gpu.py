"""GPU only (skipped without CUDA): what dropping the padding mask buys on a GPU, at the paper's sequence length.

A random Qwen2 in R1-Distill-1.5B's widths (hidden 1,536, 12 heads, 2 KV heads, V = 151,936) with 4 layers, two rows of
512 + 8,192 and 512 + 5,000 tokens (the second padded), through the trainer's ``response_logprobs``:
- bf16: the trainer's causal forward runs under SDPA's flash kernel alone; the padding-masked forward cannot
  (flash takes no mask);
- bf16: forward + backward peaks lower without the mask, by more than the [B, 1, L, L] bool mask;
- fp32 (no flash: both use the same kernels otherwise): the log-probs agree with the masked forward's.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.padding_mask import PaddingMaskForward
from tests.support.ragged_batch import ragged_batch

pytestmark = pytest.mark.gpu

PROMPT, RESPONSES, V, TEMP = 512, (8192, 5000), 151_936, 0.7


def _model(dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                      num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device="cuda", dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _batch():
    return ragged_batch([PROMPT] * len(RESPONSES), RESPONSES, V, mixed_fraction=0.1)


def _forward_backward(model, prompts, records):
    from ngrpo_ray.training.logprobs import response_logprobs

    model.zero_grad(set_to_none=True)
    tb = response_logprobs(model, prompts, records, TEMP, chunk_tokens=1024)
    (tb.logp * tb.mask).sum().backward()
    return tb


def test_causal_forward_runs_on_flash_and_peaks_lower():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, (prompts, records) = _model(torch.bfloat16), _batch()
    B, L = len(records), PROMPT + max(RESPONSES)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        _forward_backward(model, prompts, records)  # the trainer's forward: flash alone is enough
        with PaddingMaskForward(model.model, prompts, records), pytest.raises(RuntimeError):
            _forward_backward(model, prompts, records)  # a mask rules flash out
    peaks = {}
    for masked in (False, True):
        _forward_backward(model, prompts, records)  # warm-up of this path
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if masked:
            with PaddingMaskForward(model.model, prompts, records):
                _forward_backward(model, prompts, records)
        else:
            _forward_backward(model, prompts, records)
        torch.cuda.synchronize()
        peaks[masked] = torch.cuda.max_memory_allocated() - base
    print(f"\nbf16 forward + backward, {B} x {L} tokens, 4 layers: peak {peaks[False] / 1e9:.2f} GB without the mask, "
          f"{peaks[True] / 1e9:.2f} GB with it (bool mask alone {B * L * L / 1e9:.2f} GB)")
    assert peaks[True] - peaks[False] > B * L * L, peaks


def test_fp32_log_probs_agree_with_the_masked_forward():
    from ngrpo_ray.training.logprobs import response_logprobs

    model, (prompts, records) = _model(torch.float32), _batch()
    with torch.no_grad():
        causal = response_logprobs(model, prompts, records, TEMP, chunk_tokens=1024)
        with PaddingMaskForward(model.model, prompts, records):
            masked = response_logprobs(model, prompts, records, TEMP, chunk_tokens=1024)
    diff = float((causal.logp - masked.logp).abs()[causal.mask].max())
    print(f"\nfp32 log-probs, causal vs padding-masked forward: max |diff| {diff:.2e}")
    assert diff < 1e-4
