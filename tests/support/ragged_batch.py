"""Random prompts and response records of the given lengths (mixed steps with 3 candidates each): a ragged batch, so
the trainer pads every row but the longest."""

from __future__ import annotations

from typing import Sequence

import torch

from ngrpo_ray.core.records import ResponseRecord


def ragged_batch(prompt_lengths: Sequence[int], response_lengths: Sequence[int], vocab: int, mixed_fraction: float,
                 seed: int = 1) -> tuple[list[torch.Tensor], list[ResponseRecord]]:
    g = torch.Generator().manual_seed(seed)
    prompts, records = [], []
    for p, t in zip(prompt_lengths, response_lengths):
        prompts.append(torch.randint(2, vocab, (p,), generator=g))
        records.append(ResponseRecord(response_ids=torch.randint(2, vocab, (t,), generator=g), logprobs=torch.zeros(t),
                                      mixed_mask=torch.rand(t, generator=g) < mixed_fraction,
                                      cand_ids=torch.randint(2, vocab, (t, 3), generator=g),
                                      alpha=torch.softmax(torch.randn(t, 3, generator=g), -1)))
    return prompts, records
