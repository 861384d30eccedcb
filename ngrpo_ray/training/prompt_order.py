"""Seeded, resumable order of training prompts.

Epoch e visits every problem once in the permutation drawn from (seed, e); iteration i takes the next
`batch` indices, crossing into the next epoch when one ends. The position is just the iteration number, so a
resumed run sees exactly the prompts an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np


class PromptOrder:
    def __init__(self, num_problems: int, batch: int, seed: int):
        if num_problems < 1 or batch < 1:
            raise ValueError(f"need at least one problem and batch >= 1, got {num_problems} problems, batch {batch}")
        self.num_problems, self.batch, self.seed = num_problems, batch, seed

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_problems)

    def batch_at(self, iteration: int) -> list[int]:
        """Problem indices for 0-based `iteration`."""
        start = iteration * self.batch
        out: list[int] = []
        while len(out) < self.batch:
            epoch, offset = divmod(start + len(out), self.num_problems)
            perm = self.epoch_permutation(epoch)
            take = min(self.batch - len(out), self.num_problems - offset)
            out.extend(int(x) for x in perm[offset: offset + take])
        return out

    def iterations_per_epoch(self) -> int:
        return -(-self.num_problems // self.batch)
