"""One response to train on, as the trainer ranks see it. This module imports no Ray."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ngrpo_ray.core.records import ResponseRecord


@dataclass
class TrainSequence:
    """One response to train on: its prompt, its records, its advantage (scalar or per token [T])."""

    prompt_ids: torch.Tensor  # [P] int64
    record: ResponseRecord
    advantage: torch.Tensor  # [] or [T] float32
    index: int = 0  # position in the global batch (fixes mini-batch membership independently of the rank count)


def seq_tokens(s: TrainSequence) -> int:
    """Prompt plus response tokens: what a micro-batch's token budget counts."""
    return int(s.prompt_ids.numel()) + len(s.record)
