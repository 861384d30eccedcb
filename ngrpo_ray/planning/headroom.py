"""How far a plan's two memory knobs can go on its card: the largest ``trainer.max_tokens_per_micro_batch`` the update
phase holds, and the range of ``rollout.gpu_memory_utilization`` that the engine's own terms need and the rollout
phase allows. Solved from the plan's own terms: the activations grow linearly with the micro-batch's tokens and
nothing else in the update phase does (the log-softmax chunk and the head's gradient stop at one chunk); the rollout
phase grows with the reservation alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ngrpo_ray.planning.terms import RESIDENT, UPDATE, Term

_NOT_WITH_TOKENS = ("activations", "fp32 gradient in step()")  # the first scales; the second never meets it


@dataclass(frozen=True)
class Headroom:
    max_tokens: int | None  # the largest token budget per micro-batch that fits every trainer GPU (None: none there)
    longest_sequence: int  # a micro-batch holds at least one
    utilization_min: float | None  # the engine's terms fill this fraction of the card (None: no engine GPU)
    utilization_max: float | None  # beyond this the rollout phase exceeds the card


def max_tokens(terms: list[Term], card: float, per_token: float) -> int:
    """Tokens per micro-batch at which a GPU's update phase reaches the card."""
    fixed = sum(x.bytes for x in terms if x.phase in (RESIDENT, UPDATE) and x.name not in _NOT_WITH_TOKENS)
    return max(0, math.floor((card - fixed) / per_token))


def utilization_max(rollout_peak: float, reservation: float, card: float) -> float:
    """The reservation's fraction at which the rollout phase reaches the card (the rest of the phase stays)."""
    return (card - (rollout_peak - reservation)) / card


def format_headroom(h: Headroom, tokens_now: int | None, utilization_now: float) -> list[str]:
    lines = []
    if h.max_tokens is not None:
        now = f"now {tokens_now:,}" if tokens_now is not None else "now micro-batches by count"
        fits = "" if h.max_tokens >= h.longest_sequence else f"; below one longest sequence, {h.longest_sequence:,}"
        lines.append(f"headroom: trainer.max_tokens_per_micro_batch up to {h.max_tokens:,}; {now}{fits}")
    if h.utilization_min is not None and h.utilization_max is not None:
        lines.append(f"headroom: rollout.gpu_memory_utilization from {math.ceil(h.utilization_min * 100) / 100:.2f} "
                     f"(the engine's terms) to {math.floor(h.utilization_max * 100) / 100:.2f} (the card); "
                     f"now {utilization_now:.2f}")
    return lines
