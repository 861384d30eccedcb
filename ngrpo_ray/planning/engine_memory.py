"""Per-GPU memory of one vLLM engine (or one tensor-parallel shard of it) serving the rollout batch.

Model (bytes; P parameters, b bytes of the model dtype, TP shards, L layers, g KV heads, d head dim):
  weights            P b / TP
  KV cache           the engine's share of the rollout batch held at once: group_size x ceil(prompts / engines)
                     sequences x (data.max_prompt_tokens + rollout.max_new_tokens) tokens x L x 2 x ceil(g / TP) x d x b
  mixing tables      ring table (mixing.table_slots + 1) x (8 + 12 k_max + 12) B (ids, candidates, alphas, log-prob,
                     noise seed; k_max = the record width, max(k or top_k, 4), as the engine is built); gaussian_noise:
                     the noise table (slots + 1) x h x b. Buffers of the embedding module, so vLLM counts them.
  vLLM runtime       forward activations at 8,192 batched tokens ((2 h + 2 I / TP) x b each), the sampler's fp32
                     logits, probabilities and sorted copy for max_num_seqs x V, CUDA graphs (0.5 GiB unless
                     enforce_eager) and the context (0.5 GiB)
The engine reserves rollout.gpu_memory_utilization x the card; the terms above must fit inside that reservation.

Outside the reservation (allocated after vLLM sized its KV cache to fill the reservation):
  neighbor table     neighbor_mix: V x k_max int64, plus under TP > 1 the embedding gathered from every shard,
                     V x h x b per rank (engine.embedding_patch.full_weight); kept while the engine sleeps
  neighbor search    neighbor_mix, at every weight load (engine.neighbor_tables, "full" mode on GPU): fp32 search keys
                     V x h x 4 and one chunk of scores 512 x V x 4 (FULL_BUILD_CHUNK_ROWS); handed back to CUDA
                     (torch.cuda.empty_cache) before the engine sleeps. The first build runs inside a decode step,
                     beside the hook's step temporaries, so the two are added.
  mixing hook step   every strategy (every rollout request opts in to the records): the hook's per-step
                     temporaries, which vLLM's memory profile never sees (the hook skips its profiling run), see
                     hook_step_bytes
Asleep (colocated, vLLM sleep mode level 1: weights offloaded, KV cache dropped) its context, graphs and the neighbor
table stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ngrpo_ray.core.mixing_spec import SOFT_STRATEGIES
from ngrpo_ray.engine.neighbor_tables import FULL_BUILD_CHUNK_ROWS as SEARCH_CHUNK_ROWS
from ngrpo_ray.planning.model_shape import ModelShape
from ngrpo_ray.planning.terms import GIB, ROLLOUT, UPDATE, Term

BATCHED_TOKENS = 8192  # vLLM's scheduler token budget per step (profiled at start-up)


@dataclass(frozen=True)
class EngineSettings:
    shape: ModelShape
    dtype_bytes: int
    tensor_parallel: int
    sequences: int  # rollout sequences this engine holds at once
    sequence_tokens: int  # max prompt + max new tokens
    strategy: str
    k: int
    table_slots: int
    max_num_seqs: int
    enforce_eager: bool


def kv_bytes_per_token(s: ModelShape, b: int, tp: int) -> int:
    return s.layers * 2 * math.ceil(s.kv_heads / tp) * s.head_dim * b


def engine_terms(e: EngineSettings) -> list[Term]:
    s, b, tp = e.shape, e.dtype_bytes, e.tensor_parallel
    P = s.params()
    shard = f" / TP {tp}" if tp > 1 else ""
    terms = [Term("engine", "weights", P * b / tp, ROLLOUT, f"{P / 1e9:.2f}B x {b} B{shard}")]
    per_token = kv_bytes_per_token(s, b, tp)
    tokens = e.sequences * e.sequence_tokens
    terms.append(Term("engine", "KV cache (rollout batch)", tokens * per_token, ROLLOUT,
                      f"{e.sequences} seqs x {e.sequence_tokens:,} tokens x {s.layers} layers x 2 x "
                      f"{math.ceil(s.kv_heads / tp)} kv heads x {s.head_dim} x {b} B"))
    k_max = max(e.k, 4)
    slots = e.table_slots + 1
    tables = slots * (8 + 12 * k_max + 12)
    parts = [f"ring {slots:,} x {8 + 12 * k_max + 12} B"]
    if e.strategy == "gaussian_noise":
        tables += slots * s.hidden * b
        parts.append(f"noise {slots:,} x {s.hidden} x {b} B")
    terms.append(Term("engine", "mixing hook tables", tables, ROLLOUT, "; ".join(parts)))
    forward = BATCHED_TOKENS * (2 * s.hidden + 2 * s.intermediate // tp) * b
    sampler = e.max_num_seqs * s.vocab * 4 * 3
    fixed = (0.5 if e.enforce_eager else 1.0) * GIB
    terms.append(Term("engine", "vLLM runtime", forward + sampler + fixed, ROLLOUT,
                      f"activations {BATCHED_TOKENS:,} tokens + sampler {e.max_num_seqs} x V x 12 B + "
                      f"{'context' if e.enforce_eager else 'context, CUDA graphs'}"))
    return terms


def hook_step_bytes(strategy: str, rows: int, vocab: int) -> float:
    """The mixing hook's temporaries in one decode step of ``rows`` requests: at a temperature other than 1, the
    tempered fp32 logits of every row and the pass of their log-normaliser, 2 x rows x V x 4 B; the soft-token
    kernels (top-K of the log-probabilities) one more [rows, V] fp32 pass, 3 x. Their peak is the pre-hook's, and
    the tempered logits live on through vLLM's sampler. Measured on CPU with V = 151,936 at temperature 0.7
    (tests/engine/test_hook_step_memory.py): the pre-hook peaks at exactly 2.00 x (sample, neighbor_mix,
    gaussian_noise) and 3.00 x (gumbel_topk, soft_thinking, latent_gumbel). At temperature 1 with vLLM's raw
    log-probs the hook skips the full pass (0 to 2 x): the bound stays."""
    return hook_step_factor(strategy) * rows * vocab * 4


def hook_step_factor(strategy: str) -> int:
    """[rows, V] fp32 tensors the hook's step holds at its peak (hook_step_bytes)."""
    return 3 if strategy in SOFT_STRATEGIES else 2


def outside_reservation_terms(e: EngineSettings) -> list[Term]:
    """What the mixing hook allocates after vLLM filled its reservation: on the card beside it."""
    V = e.shape.vocab
    step = Term("engine", "mixing hook step", hook_step_bytes(e.strategy, e.max_num_seqs, V), ROLLOUT,
                f"{hook_step_factor(e.strategy)} x {e.max_num_seqs} rows x V {V:,} x 4 B (fp32 logits passes); "
                f"beside the reservation")
    if e.strategy != "neighbor_mix":
        return [step]
    s, b, tp = e.shape, e.dtype_bytes, e.tensor_parallel
    k_max = max(e.k, 4)
    table = V * k_max * 8
    how = f"V {V:,} x {k_max} x 8 B"
    if tp > 1:
        table += V * s.hidden * b
        how += f" + the gathered embedding V x {s.hidden} x {b} B (TP {tp}: every rank holds it whole)"
    search = V * s.hidden * 4 + SEARCH_CHUNK_ROWS * V * 4
    return [Term("engine", "neighbor table", table, ROLLOUT, how + "; beside the reservation"),
            Term("engine", "neighbor search (weight load)", search, ROLLOUT,
                 f"fp32 keys V x {s.hidden} x 4 B + scores {SEARCH_CHUNK_ROWS:,} x V x 4 B; freed before sleep"),
            step]


def asleep_term(enforce_eager: bool, outside: list[Term] = ()) -> Term:
    """vLLM sleep level 1 keeps its context and graphs; the hook keeps its neighbor table (not its search keys)."""
    kept = sum(x.bytes for x in outside if x.name == "neighbor table")
    how = "vLLM sleep level 1: weights offloaded, KV cache dropped" + ("; the neighbor table stays" if kept else "")
    name = "asleep (context, graphs, neighbors)" if kept else "asleep (context, CUDA graphs)"
    return Term("engine", name, (0.5 if enforce_eager else 1.0) * GIB + kept, UPDATE, how)
