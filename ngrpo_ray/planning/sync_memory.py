"""Per-GPU memory of the weight sync: the phase after the update, while the trainer's new weights reach the engines.

By transport (distributed.placement.weight_transport; b bytes of the model dtype, V vocab, h hidden, TP shards):
  ipc   colocated on GPU (vLLM's ipc transfer). Every trainer rank packs its copy into one IPC buffer of
        max(cluster.sync_bucket_mb, the largest tensor) (vLLM's packed_ipc_producer; engine.trainer_weights sizes it),
        under ZeRO-3 after gathering the tensor it packs. The engine on that GPU has woken its weights (its KV cache
        stays asleep until the load is done), clones each received chunk (packed_ipc_consumer: at most the buffer)
        and materializes one module at a time before copying it into place (vLLM's layerwise reload).
  nccl  disaggregated (vLLM's nccl transfer, packed). Trainer rank 0 keeps two chunks in flight
        (DEFAULT_PACKED_NUM_BUFFERS); a chunk is the tensors read until they pass the bucket, so below bucket +
        the largest tensor; under ZeRO-3 the gathered tensors of the chunk being packed are held too. The engine, awake
        with its KV cache in its reservation, receives into two chunks beside it, and its layerwise reload holds the
        chunks of a module until the module is complete (one module materialized at a time).
  gloo  CPU runs: host memory, no GPU term.
Either way the engine then builds its neighbor table from the new embedding (the plan's "neighbor search (weight
load)" term, added to this phase's peak). From vLLM 0.32's code; not measured on a GPU (none was lent): a run logs
``memory/sync_peak_allocated_gib`` of the trainer ranks beside ``memory_plan.trainer_sync_gib``.
"""

from __future__ import annotations

from ngrpo_ray.planning.model_shape import ModelShape
from ngrpo_ray.planning.terms import GIB, SYNC, Term

IN_FLIGHT_CHUNKS = 2  # vLLM's DEFAULT_PACKED_NUM_BUFFERS (nccl); not imported: planning stays free of vLLM


def largest_tensor(s: ModelShape) -> int:
    """Elements of the largest tensor the trainer sends (HF names: embedding, q/k/v/o, gate/up/down apart)."""
    return max(s.vocab * s.hidden, s.intermediate * s.hidden, s.heads * s.head_dim * s.hidden)


def largest_engine_module(s: ModelShape, tp: int) -> int:
    """Elements of the largest module of one engine rank (vLLM fuses q/k/v and gate/up; TP shards them)."""
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim * s.hidden
    return max(s.vocab * s.hidden, 2 * s.intermediate * s.hidden, qkv) // tp


def sync_terms(s: ModelShape, b: int, transport: str, bucket_bytes: int, zero3: bool,
               tp: int) -> tuple[list[Term], list[Term]]:
    """(a trainer rank's terms, an engine rank's terms) of the sync phase; both empty for gloo."""
    big = largest_tensor(s) * b
    big_how = f"largest tensor V {s.vocab:,} x {s.hidden} x {b} B" if big == s.vocab * s.hidden * b else \
        f"largest tensor {big:,} B"
    module = largest_engine_module(s, tp) * b
    if transport == "ipc":
        buffer = max(bucket_bytes, big)
        trainer = [Term("trainer", "weight-sync IPC buffer", buffer, SYNC,
                        f"max(sync_bucket_mb, {big_how}): vLLM's packed IPC buffer, one per rank")]
        if zero3:
            trainer.append(Term("trainer", "ZeRO-3 gather (sync)", big, SYNC,
                                f"the tensor being packed, gathered whole: {big_how}"))
        engine = [Term("engine", "weights (woken for the load)", s.params() * b / tp, SYNC,
                       f"{s.params() / 1e9:.2f}B x {b} B{f' / TP {tp}' if tp > 1 else ''}; KV cache still asleep"),
                  Term("engine", "weight load", buffer + module, SYNC,
                       f"a chunk's clones (<= the IPC buffer) + the largest module materialized "
                       f"({module / GIB:.2f} GiB)")]
        return trainer, engine
    if transport == "nccl":
        chunk = bucket_bytes + big
        trainer = [Term("trainer", "weight-sync chunks (rank 0)", IN_FLIGHT_CHUNKS * chunk, SYNC,
                        f"{IN_FLIGHT_CHUNKS} in flight x (sync_bucket_mb + {big_how})")]
        if zero3:
            trainer.append(Term("trainer", "ZeRO-3 gather (sync)", chunk, SYNC,
                                "the gathered tensors of the chunk being packed (rank 0)"))
        engine = [Term("engine", "weight load", IN_FLIGHT_CHUNKS * chunk + module, SYNC,
                       f"{IN_FLIGHT_CHUNKS} received chunks + the largest module materialized "
                       f"({module / GIB:.2f} GiB); beside the reservation")]
        return trainer, engine
    return [], []
