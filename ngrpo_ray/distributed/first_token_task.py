"""algorithm.first_token_selection next to the batches: a Ray task turns the sequence advantages into per-token
ones (training/first_token.py) without bringing the batches to the driver."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from ngrpo_ray.training.first_token import first_token_advantages


@ray.remote(num_cpus=0.1, num_returns=2)
def _per_token(refs: list, advantages: torch.Tensor, correct: torch.Tensor, group_size: int):
    return first_token_advantages(ray.get(refs), advantages, correct, group_size)


def apply(chunk_refs: list, advantages: torch.Tensor, rewards: np.ndarray, group_size: int,
          ) -> tuple[ray.ObjectRef, dict[str, float]]:
    """(ref to the N per-token advantages, for TrainerGroup.train; the counts). Correct: reward > 0.5, as the
    iteration's accuracy counts it."""
    correct = torch.as_tensor(np.asarray(rewards) > 0.5)
    per_token, info = _per_token.remote(list(chunk_refs), advantages, correct, group_size)
    return per_token, ray.get(info)
