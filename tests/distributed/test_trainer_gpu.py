"""Issue 12, done-when 7 (GPU only; skipped without CUDA): the trainer step at the paper's shapes.

A random-init model in Qwen2.5-1.5B's shape (hidden 1,536, 28 layers, vocabulary 151,936), bf16 with DeepSpeed's fp32
master weights, gradient checkpointing, one rank (NCCL), the project's own ``train_on_sequences``: one micro-batch of
8 x (512 + 8,192) tokens (token budget 69,632) with ~10% mixed steps, under ZeRO-2 and ZeRO-3. Asserts the peak
memory <= 75 GB (an 80 GB card's budget) and prints tokens/s, peak memory and model FLOP utilisation against a bf16
matmul rate measured on the same card. Ray and vLLM are not needed (the GPU machine may lack them).
Model FLOPs per optimizer step: 6 x (non-embedding parameters) per token + 6 x V x d per response token (the head
runs on response positions only) + 6 x layers x d x (sequence length) per token (causal attention, forward and
backward); the recompute of gradient checkpointing is not counted (it is overhead, as in the usual MFU).
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPT, RESPONSE, SEQS = 512, 8192, 8
SHAPE = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
             num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32_768, tie_word_embeddings=True)


def _bf16_matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0)


def _sequences(vocab: int):
    from ngrpo_ray.core.records import ResponseRecord
    from ngrpo_ray.training.train_sequence import TrainSequence

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(SEQS):
        record = ResponseRecord(response_ids=torch.randint(2, vocab, (RESPONSE,), generator=g),
                                logprobs=-torch.rand(RESPONSE, generator=g), mixed_mask=torch.rand(RESPONSE, generator=g) < 0.1,
                                cand_ids=torch.randint(2, vocab, (RESPONSE, 3), generator=g),
                                alpha=torch.softmax(torch.randn(RESPONSE, 3, generator=g), -1))
        out.append(TrainSequence(prompt_ids=torch.randint(2, vocab, (PROMPT,), generator=g), record=record,
                                 advantage=torch.tensor(1.0 if i % 2 else -1.0), index=i))
    return out


def _engine(stage: int):
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings, build_config, build_optimizer

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="nccl")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE)).to(dtype=torch.bfloat16, device="cuda")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = DeepSpeedSettings(zero_stage=stage, dtype="bf16", lr=1e-6)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(settings, model.parameters()),
                                           config=build_config(settings, 1, 1))
    return engine, model


@pytest.mark.parametrize("stage", [2, 3])
def test_paper_shape_step_fits_80gb_and_reports_mfu(stage):
    rate = _bf16_matmul_rate()
    engine, model = _engine(stage)
    try:
        _measure(stage, rate, engine, model)
    finally:  # the other stage's run must not count this engine's memory
        getattr(engine, "destroy", lambda: None)()
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()


def _measure(stage, rate, engine, model):
    from ngrpo_ray.core.losses import PolicyLossConfig
    from ngrpo_ray.training.train_step import StepSettings, train_on_sequences

    seqs = _sequences(SHAPE["vocab_size"])
    step = StepSettings(temperature=0.7, old_logprobs="rollout", max_tokens_per_micro_batch=SEQS * (PROMPT + RESPONSE),
                        logprob_chunk_tokens=1024)
    loss = PolicyLossConfig(loss_type="grpo")
    train_on_sequences(engine, seqs, [s.index for s in seqs], step, loss)  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = train_on_sequences(engine, seqs, [s.index for s in seqs], step, loss)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    d, L, V = SHAPE["hidden_size"], SHAPE["num_hidden_layers"], SHAPE["vocab_size"]
    n_body = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) - V * d
    tokens, responses, length = SEQS * (PROMPT + RESPONSE), SEQS * RESPONSE, PROMPT + RESPONSE
    flops = 6 * n_body * tokens + 6 * V * d * responses + 6 * L * d * length * tokens
    mfu = flops / seconds / rate
    print(f"\nZeRO-{stage} bf16, {SEQS} x ({PROMPT} + {RESPONSE}) tokens, 1 micro-batch: {tokens / seconds:,.0f} tokens/s, "
          f"peak {peak / 1e9:.1f} GB, MFU {100 * mfu:.1f}% of a measured {rate / 1e12:.0f} TFLOP/s bf16 matmul "
          f"(loss {metrics['loss']:.4f}, entropy {metrics['entropy_mean']:.3f})")
    assert metrics["tokens"] == responses
    assert peak <= 75e9, f"peak {peak / 1e9:.1f} GB > 75 GB"
