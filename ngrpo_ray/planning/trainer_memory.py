"""Per-GPU memory of one trainer rank: DeepSpeed's states by ZeRO stage, activations at the micro-batch size, the
chunked log-softmax buffer and the reference model.

Model (bytes; P parameters, N trainer GPUs, b bytes of the model dtype, DeepSpeed with AdamW):
  weights            P b           (ZeRO-3: P b / N)
  fp32 master        4 P / N       (bf16 only; ZeRO >= 1 partitions it; in fp32 the weights are the master)
  gradients          P g / N       (ZeRO-2/3 partition, g = 4 as bf16 runs accumulate it in fp32; ZeRO-0/1: P b)
                                   + one reduce bucket of 5e8 elements x b
  optimizer states   8 P / N       (AdamW m and v in fp32; ZeRO-0: 8 P)
  fp32 grad at step  4 P / N       (bf16 ZeRO-1: the partition's fp32 gradient exists during step() only)
  ZeRO-3 gathers     (min(P, stage3_max_live_parameters) + the largest module) x b: what the prefetcher may hold
                     beside the module in use (update only; measured on a CPU model with the 7B's proportions,
                     tests/training/test_zero3_trace.py)
  reference model    P b           (beta > 0: a copy in the model dtype; ZeRO-3: P b / N, partitioned like the
                                   policy, training.reference_model)
  activations        per token and layer, what autograd keeps for backward in a HF decoder layer with fused
                     attention: two RMSNorms (their fp32 input copy and b-byte output: 2 (4 + b) h), q, k, v and the
                     attention output and o_proj input (b (3 a d + 2 g d)), the softmax log-sum-exp (4 a), and the
                     SwiGLU MLP's gate, up, silu(gate) and product (4 b I). With gradient checkpointing only each
                     layer's input (b h) is kept and one layer is recomputed at a time.
  log-softmax chunk  c x V x (3 x 4 + b): the head's b-byte logits of c response tokens, their fp32 copy, the fp32
                     log-softmax and its gradient; c = min(trainer.logprob_chunk_tokens, the micro-batch's response
                     tokens), so it does not grow with the response length.
  head gradient      3 x V x h x b in backward when the head runs in more than one chunk (each chunk's backward makes a
                     [V, h] weight gradient and autograd sums them: the running sum, the next gradient and their sum
                     are alive at once), 1 x with one chunk; measured on CPU with V = 151,936
                     (tests/training/test_head_gradient_memory.py)
  CUDA context       1 GiB (context, NCCL buffers, allocator slack)
The micro-batch holds max(trainer.max_tokens_per_micro_batch, one longest sequence) tokens when the budget is set,
else trainer.micro_batch_size longest sequences (padded); longest = data.max_prompt_tokens + rollout.max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ngrpo_ray.planning.model_shape import ModelShape
from ngrpo_ray.planning.terms import GIB, RESIDENT, UPDATE, Term

REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters (training sets none)
CUDA_CONTEXT_BYTES = 1.0 * GIB


@dataclass(frozen=True)
class TrainerSettings:
    shape: ModelShape
    dtype_bytes: int  # 2 (bf16) or 4 (fp32)
    zero_stage: int
    gpus: int  # trainer ranks = data-parallel size
    micro_batch_tokens: int  # prompt + response tokens of one micro-batch (padding included)
    micro_batch_response_tokens: int
    logprob_chunk_tokens: int
    gradient_checkpointing: bool
    ref_model: bool
    micro_batch_note: str = ""


def activation_bytes_per_token_layer(s: ModelShape, b: int) -> int:
    h, a, g, d, inter = s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate
    norms = 2 * (4 + b) * h
    attention = b * (3 * a * d + 2 * g * d) + 4 * a
    mlp = 4 * b * inter
    return norms + attention + mlp


def activation_bytes_per_token(s: ModelShape, b: int, checkpointing: bool) -> int:
    layer = activation_bytes_per_token_layer(s, b)
    tail = (4 + b) * s.hidden  # the final norm
    if checkpointing:
        return s.layers * b * s.hidden + layer + tail
    return s.layers * layer + tail


def trainer_terms(t: TrainerSettings) -> list[Term]:
    s, b, n, z = t.shape, t.dtype_bytes, t.gpus, t.zero_stage
    P = s.params()
    dt = "bf16" if b == 2 else "fp32"
    terms: list[Term] = []
    shard = f"1/{n} shard" if n > 1 else "whole"
    if z == 3:
        terms.append(Term("trainer", "weights", P * b / n, RESIDENT, f"{P / 1e9:.2f}B x {b} B ({dt}) / {n} (ZeRO-3)"))
    else:
        terms.append(Term("trainer", "weights", P * b, RESIDENT, f"{P / 1e9:.2f}B x {b} B ({dt}), full copy"))
    if b == 2:
        div = n if z >= 1 else 1
        terms.append(Term("trainer", "fp32 master weights", 4 * P / div, RESIDENT,
                          f"{P / 1e9:.2f}B x 4 B / {div} (ZeRO-{z}, {shard if z >= 1 else 'whole'})"))
    grad_div = n if z >= 2 else 1
    bucket = REDUCE_BUCKET_ELEMENTS * b if z >= 2 else 0
    gb = 4 if b == 2 and z >= 2 else b  # bf16 with ZeRO-2/3: accumulated in fp32 (deepspeed_config: grad_accum_dtype)
    terms.append(Term("trainer", "gradients", P * gb / grad_div + bucket, RESIDENT,
                      f"{P / 1e9:.2f}B x {gb} B / {grad_div}"
                      + (f" + reduce bucket 5e8 x {b} B" if bucket else "")))
    opt_div = n if z >= 1 else 1
    terms.append(Term("trainer", "optimizer states (AdamW)", 8 * P / opt_div, RESIDENT,
                      f"{P / 1e9:.2f}B x 8 B / {opt_div}"))
    if z == 3:
        largest = max(s.layer_params(), s.vocab * s.hidden)
        live = min(P, ZERO3_MAX_LIVE_PARAMETERS)
        # gathered for the forward and backward only: released after the step, and the weight sync gathers one
        # parameter at a time
        terms.append(Term("trainer", "ZeRO-3 gathered modules", (live + largest) * b, UPDATE,
                          f"({live / 1e6:,.0f}M prefetched, DeepSpeed's live limit + {largest / 1e6:.0f}M in use) "
                          f"x {b} B"))
    if t.ref_model:
        if z == 3:
            terms.append(Term("trainer", "reference model", P * b / n, RESIDENT,
                              f"{P / 1e9:.2f}B x {b} B / {n} (algorithm.beta > 0; ZeRO-3, partitioned)"))
        else:
            terms.append(Term("trainer", "reference model", P * b, RESIDENT,
                              f"{P / 1e9:.2f}B x {b} B, full copy (algorithm.beta > 0)"))
    terms.append(Term("trainer", "CUDA context, NCCL", CUDA_CONTEXT_BYTES, RESIDENT, "1 GiB"))
    per_token = activation_bytes_per_token(s, b, t.gradient_checkpointing)
    other = t.micro_batch_tokens * activation_bytes_per_token(s, b, not t.gradient_checkpointing) / GIB
    ckpt = (f"gradient checkpointing; without: {other:.1f} GiB" if t.gradient_checkpointing
            else f"no gradient checkpointing; with: {other:.1f} GiB")
    terms.append(Term("trainer", "activations", t.micro_batch_tokens * per_token, UPDATE,
                      f"{t.micro_batch_tokens:,} tokens x {per_token / 1024:.0f} KiB ({ckpt}; {t.micro_batch_note})"))
    c = max(1, min(t.logprob_chunk_tokens, t.micro_batch_response_tokens))
    terms.append(Term("trainer", "log-softmax chunk", c * s.vocab * (12 + b), UPDATE,
                      f"{c:,} tokens x V {s.vocab:,} x (3 x 4 + {b}) B"))
    copies = 3 if t.micro_batch_response_tokens > c else 1
    terms.append(Term("trainer", "head gradient (backward)", copies * s.vocab * s.hidden * b, UPDATE,
                      f"{copies} x V {s.vocab:,} x {s.hidden} x {b} B"
                      + (" (autograd sums the chunks' gradients: the sum, the next one, the result)" if copies > 1
                         else "")))
    if b == 2 and z == 1:
        # exists only inside step(), when the activations are gone: counted as the larger of the two below (ZeRO-2/3
        # accumulate the gradient partition in fp32 already)
        terms.append(Term("trainer", "fp32 gradient in step()", 4 * P / n, UPDATE, f"{P / 1e9:.2f}B x 4 B / {n}"))
    return terms


def update_peak(terms: list[Term]) -> float:
    """Bytes of the update phase's transient terms at their peak: forward/backward (activations + log-softmax chunk)
    and step() (the fp32 gradient partition) do not overlap."""
    fb = sum(t.bytes for t in terms if t.phase == UPDATE and t.name != "fp32 gradient in step()")
    step = sum(t.bytes for t in terms if t.name == "fp32 gradient in step()")
    return max(fb, step)
