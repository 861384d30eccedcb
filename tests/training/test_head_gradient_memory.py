"""The memory plan's "head gradient (backward)" term against the chunked head's measured backward, with the real
R1 / Qwen vocabulary (V = 151,936).

Each chunk's backward makes a [V, h] weight gradient and autograd sums the chunks' gradients in one buffer: the
running sum, the next gradient and their sum are alive at once, 3 x V x h x b. With one chunk there is one. Measured
with torch's profiler timeline (CPU tensors created during forward + backward), in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.token_logprobs import chunked_token_logprobs
from ngrpo_ray.planning.model_shape import ModelShape
from ngrpo_ray.planning.trainer_memory import TrainerSettings, trainer_terms
from tests.support.memory_timeline import transient_peak_bytes

V, H, TOKENS = 151_936, 256, 128


def _plan_terms(response_tokens: int, chunk: int, b: int) -> dict[str, float]:
    shape = ModelShape(hidden=H, intermediate=512, layers=1, heads=4, kv_heads=4, head_dim=64, vocab=V,
                       tied_embeddings=False, qkv_bias=False, qk_norm=False)
    terms = trainer_terms(TrainerSettings(shape=shape, dtype_bytes=b, zero_stage=2, gpus=1,
                                          micro_batch_tokens=response_tokens, micro_batch_response_tokens=response_tokens,
                                          logprob_chunk_tokens=chunk, gradient_checkpointing=True, ref_model=False))
    return {t.name: t.bytes for t in terms}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [32, TOKENS])
def test_head_gradient_term_is_the_measured_backward_peak(dtype, chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False).to(dtype)
    hidden = torch.randn(TOKENS, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (TOKENS,))

    def forward_backward():
        logp, _ = chunked_token_logprobs(head, hidden, targets, 0.7, chunk_tokens=chunk)
        logp.sum().backward()

    forward_backward()  # the head's .grad exists, as in every micro-batch after the first
    peak = transient_peak_bytes(forward_backward)
    b = torch.finfo(dtype).bits // 8
    plan = _plan_terms(TOKENS, chunk, b)
    term = plan["head gradient (backward)"]
    grad = V * H * b
    if chunk < TOKENS:  # four chunks: the peak is the three gradient copies
        assert term == 3 * grad
        assert 0.98 * term <= peak <= 1.02 * term, peak / grad
    else:  # one chunk: one gradient beside the chunk's logits and fp32 work (the plan's log-softmax chunk term)
        assert term == grad
        assert peak <= term + plan["log-softmax chunk"], peak / grad
