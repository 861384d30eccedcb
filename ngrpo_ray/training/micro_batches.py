"""How one rank's share of a mini-batch is cut into micro-batches: a fixed count, or a token budget.

With ``max_tokens_per_micro_batch`` the sequences are sorted by length (longest first) and packed greedily into
right-padded micro-batches whose PADDED size (rows x longest row) stays within the budget, so neighbours have
similar lengths and little padding; a sequence longer than the budget gets a micro-batch of its own. The loss of
every micro-batch is divided by the GLOBAL counts of its mini-batch, so how the sequences are split does not change
the update. Every rank must run the same number of micro-batches (each backward may all-reduce): the count is the
maximum over ranks, and ranks with fewer fill up with zero-weight dummies (``train_step``).
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


def split_even(items: list, parts: int) -> list[list]:
    n = len(items)
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [items[bounds[i]: bounds[i + 1]] for i in range(parts)]


def split_by_tokens(items: Sequence[Item], lengths: Sequence[int], budget: int) -> list[list[Item]]:
    """Longest first; a micro-batch takes the next sequence while (rows + 1) x its longest row <= budget."""
    order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
    out: list[list[Item]] = []
    longest = 0
    for i in order:
        if out and (len(out[-1]) + 1) * longest <= budget:
            out[-1].append(items[i])
        else:
            out.append([items[i]])
            longest = lengths[i]  # descending order: the first row of a micro-batch is its longest
    return out


def split_micro_batches(items: Sequence[Item], lengths: Sequence[int], micro_batches: int,
                        max_tokens: int | None) -> list[list[Item]]:
    """This rank's micro-batches: ``micro_batches`` even parts, or by the token budget when ``max_tokens`` is set."""
    if max_tokens is None:
        return split_even(list(items), micro_batches)
    return split_by_tokens(items, lengths, max_tokens)


def global_count(local: int, device: torch.device) -> int:
    """The largest micro-batch count over the ranks (every rank runs that many)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
