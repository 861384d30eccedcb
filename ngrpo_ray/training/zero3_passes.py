"""ZeRO-3's parameter trace for a trainer that never calls the root module.

ZeRO-3 records the order in which modules fetch their parameters over one pass (forward, and backward when there is
one). From the next pass on, it prefetches the following modules' parameters while the current one computes, and
keeps a parameter gathered when it is used again soon: the output head over the chunks of one micro-batch, through
the forward and the backward's recomputes. The record is cut by a forward pre-hook on the root module
(``reset_step``). The trainer calls the decoder body and then the head in chunks, never the root, so that hook never
ran: the trace stayed invalid, every gather waited for its bytes, and the head ([V, d], 1.09 GB in bf16 at 7B) was
gathered again for each chunk's forward and recompute.

``start_pass`` is that hook, called where a pass starts. A trace holds only while every pass calls the same modules in
the same order, so the passes of one phase call the head equally often (``head_calls``: empty chunks fill up, a
module call each and no arithmetic). This module imports no Ray.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ngrpo_ray.training.micro_batches import global_count


def is_zero3(model: torch.nn.Module) -> bool:
    return hasattr(next(model.parameters()), "ds_id")  # ZeRO-3 tags its partitioned parameters


def start_pass(engine: Any) -> None:
    """What the root module's forward pre-hook does under ZeRO-3: end the previous pass's trace (the first ends
    recording, the next ones replay it with prefetch) and start a new one. No-op elsewhere."""
    optimizer = getattr(engine, "optimizer", None)
    # a training engine's ZeRO-3 optimizer holds the offload; an engine without an optimizer (the reference model) is
    # given the offload itself as its optimizer
    offload = getattr(optimizer, "parameter_offload", None) or (
        optimizer if hasattr(optimizer, "get_param_coordinator") else None)
    if offload is not None:
        offload.get_param_coordinator().reset_step()


def head_calls(response_tokens: Sequence[int], chunk_tokens: int, model: torch.nn.Module,
               budget: int | None = None) -> int | None:
    """How often every pass of a phase calls the head under ZeRO-3: enough chunks for its largest pass
    (``response_tokens``: each pass's response-token count), on the busiest rank; with a token budget per micro-batch,
    for a full one, so the count is the same in every phase of the run. None (each pass decides) without ZeRO-3."""
    if not is_zero3(model):
        return None
    need = max((math.ceil(n / chunk_tokens) for n in response_tokens), default=0)
    if budget is not None:
        need = max(need, math.ceil(budget / chunk_tokens))
    return global_count(max(need, 1), next(model.parameters()).device)
