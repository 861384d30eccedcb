"""DAPO dynamic sampling (Yu et al. 2025, section 3.2), Ray-free: refill the batch with groups that carry signal.

A group whose G rewards are all equal has GRPO advantage 0 for every member: it adds no policy gradient, only
KL and the dilution of the loss's averages. DAPO therefore over-samples: draw groups, drop the zero-variance ones,
draw again until the batch holds B = trainer.prompts_per_iteration groups with non-zero reward variance.

Here a round draws exactly the missing number of groups (round 0 draws B), so the kept groups never exceed B and
nothing generated is thrown away for being surplus. After `max_rounds` refill rounds without reaching B, the batch is
completed with zero-variance groups already drawn (the earliest first): their advantages are exactly 0, so they add
no policy gradient, and the batch keeps B x G responses, which the mini-batch divisibility rule
(config.load.validate) and the trainer's fixed micro-batch plan rely on. (verl's DAPO recipe raises instead once its
max_num_gen_batches is reached; training on what was kept would break the divisibility rule; repeating kept groups
would count their gradient twice.) Every count is reported: drawn, kept, dropped, padded, rounds.

Prompt order stays a function of the iteration: round 0 takes the training order's batch (PromptOrder.batch_at), and
refill round k takes the next prompts of a stream seeded by (trainer.seed, iteration) that skips round 0's prompts, so
a resumed or recovered run draws exactly the same prompts without any new checkpoint state, and the training order
(and so `trainer.epochs`) is the same as without dynamic sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ngrpo_ray.core.advantages import dynamic_sampling_filter

if TYPE_CHECKING:
    from ngrpo_ray.core.rollout_batch import RolloutBatch

REFILL_STREAM_TAG = 0xDA90  # keeps the refill stream apart from PromptOrder's per-epoch permutations
# Gate streams (core.gate_stream) are keyed by (call, response index within the call); a refill round's responses get
# call = policy version + round x REFILL_CALL_STRIDE, so they never share round 0's (or another version's) streams.
REFILL_CALL_STRIDE = 1 << 32


def has_signal(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[num_groups] bool: the group's rewards are not all equal (non-zero variance); the rule is the core's
    (core.advantages.dynamic_sampling_filter), on the scorer's float32 rewards."""
    r = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    return dynamic_sampling_filter(r, group_size).keep_groups.numpy()


def refill_prompts(num_problems: int, first_batch: Sequence[int], seed: int, iteration: int, start: int,
                   count: int) -> list[int]:
    """Problems `start` .. `start + count - 1` of iteration `iteration`'s refill stream: permutations of all problems
    seeded by (seed, tag, iteration, cycle), the first cycle without `first_batch` (a data set smaller than that may
    repeat problems in later cycles; each repeat is a fresh group of samples)."""
    out: list[int] = []
    skip = set(int(i) for i in first_batch)
    position, cycle = 0, 0
    while len(out) < count:
        perm = np.random.default_rng([seed, REFILL_STREAM_TAG, iteration, cycle]).permutation(num_problems)
        stream = [int(p) for p in perm if cycle > 0 or int(p) not in skip]
        for p in stream:
            if position >= start:
                out.append(p)
                if len(out) == count:
                    break
            position += 1
        cycle += 1
    return out


@dataclass
class FilledBatch:
    """Which drawn groups make the batch, as (round, group index within that round's draw), in training order
    (round, then group); and the counts."""

    picks: list[tuple[int, int]]
    groups_drawn: int
    groups_kept: int  # with signal, in the batch
    groups_dropped: int  # without signal, not in the batch
    groups_padded: int  # without signal, in the batch (the refill rounds ran out): advantage 0
    refill_rounds: int  # rounds after the first
    problems: list[list[int]] = field(default_factory=list)  # per round, the problems drawn

    def metrics(self) -> dict[str, float]:
        return {"dynamic_sampling/groups_drawn": float(self.groups_drawn),
                "dynamic_sampling/groups_kept": float(self.groups_kept),
                "dynamic_sampling/groups_dropped": float(self.groups_dropped),
                "dynamic_sampling/groups_padded": float(self.groups_padded),
                "dynamic_sampling/refill_rounds": float(self.refill_rounds)}


def fill_batch(target: int, group_size: int, max_rounds: int,
               draw: Callable[[int, list[int]], np.ndarray], first_batch: Sequence[int],
               refill: Callable[[int, int], list[int]]) -> FilledBatch:
    """Draw until `target` groups with signal are kept, or `max_rounds` refill rounds are spent (then pad).

    draw(round, problems) -> the rewards of those problems' groups, [len(problems) * group_size], group-major;
    refill(start, count) -> the refill stream's problems start .. start + count - 1 (refill_prompts)."""
    kept: list[tuple[int, int]] = []
    no_signal: list[tuple[int, int]] = []
    problems = [list(first_batch)]
    drawn, rounds, used = 0, 0, 0
    while True:
        rewards = np.asarray(draw(rounds, problems[rounds]))
        if rewards.size != len(problems[rounds]) * group_size:
            raise ValueError(f"round {rounds}: {rewards.size} rewards for {len(problems[rounds])} groups of "
                             f"{group_size}")
        signal = has_signal(rewards, group_size)
        drawn += len(signal)
        for g, ok in enumerate(signal):
            (kept if ok else no_signal).append((rounds, g))
        missing = target - len(kept)
        if missing <= 0 or rounds >= max_rounds:
            break
        rounds += 1
        problems.append(refill(used, missing))
        used += missing
    padded = no_signal[: max(target - len(kept), 0)]
    picks = sorted(kept + padded)
    return FilledBatch(picks=picks, groups_drawn=drawn, groups_kept=len(kept),
                       groups_dropped=drawn - len(kept) - len(padded), groups_padded=len(padded),
                       refill_rounds=rounds, problems=problems)


def select_groups(batch: "RolloutBatch", groups: Sequence[int]) -> "RolloutBatch":
    """The responses of `batch` whose group_index (the chunk's own prompt index) is in `groups`, in batch order."""

    from ngrpo_ray.core.rollout_batch import RolloutBatch

    wanted = {int(g) for g in groups}
    rows = [i for i, g in enumerate(batch.group_index.tolist()) if g in wanted]
    pick = lambda values: [values[i] for i in rows]  # noqa: E731
    index = torch.tensor(rows, dtype=torch.long)
    return RolloutBatch(
        prompt_ids=pick(batch.prompt_ids), response_ids=pick(batch.response_ids),
        response_text=pick(batch.response_text), logprobs=pick(batch.logprobs), mixed_mask=pick(batch.mixed_mask),
        cand_ids=pick(batch.cand_ids), alpha=pick(batch.alpha), finish_reason=pick(batch.finish_reason),
        group_index=batch.group_index[index], sample_index=batch.sample_index[index],
        policy_version=batch.policy_version[index], timings=dict(batch.timings),
        noise_seed=pick(batch.noise_seed) if batch.noise_seed is not None else None)
