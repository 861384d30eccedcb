"""The advantage step of an iteration: GRPO / Dr. GRPO advantages of the scored rollout, with their counts.
This module imports no Ray."""

from __future__ import annotations

from typing import Any

import torch

from ngrpo_ray.config import Config
from ngrpo_ray.core.advantages import dr_grpo_advantages, grpo_advantages


def compute_advantages(cfg: Config, scored: Any) -> tuple[torch.Tensor, dict]:
    """`scored`: the rollout's rewards and truncation flags in batch order (a `sample_and_score.Scored`)."""
    a = cfg.algorithm
    rewards = torch.as_tensor(scored.rewards, dtype=torch.float32)
    invalid = torch.as_tensor(scored.truncated) if a.mask_truncated else None
    G = cfg.rollout.group_size
    if a.advantage == "dr_grpo" or a.loss_type == "dr_grpo":
        out = dr_grpo_advantages(rewards, G, invalid=invalid)
    else:
        out = grpo_advantages(rewards, G, invalid=invalid)
    adv = out.advantages
    info = {"adv/num_invalid_zeroed": float(out.num_invalid_zeroed),
            "adv/num_degenerate_groups": float(out.num_degenerate_groups)}
    return adv, info
