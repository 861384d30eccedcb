"""RewardScorer: a Ray actor that grades a RolloutBatch where it lives and returns small arrays.

The driver hands it the batch's ObjectRef (Ray resolves it inside the actor), so response tensors never pass
through the driver. Grading runs in the actor's GradingPool: killable processes with a wall-clock limit per answer
(math-verify needs a main thread; a Ray actor thread has none). Besides rewards it returns the per-response facts
the driver needs for advantages and metrics (length, truncation, mixed steps), and the grading counts of this call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ray

from ngrpo_ray.core.rollout_batch import RolloutBatch
from ngrpo_ray.grading.job import GradeJob
from ngrpo_ray.grading.pool import GradingPool


def rollout_facts(batch: RolloutBatch) -> dict[str, np.ndarray]:
    return {
        "group_index": batch.group_index.numpy().copy(),
        "sample_index": batch.sample_index.numpy().copy(),
        "length": np.array([int(r.numel()) for r in batch.response_ids]),
        "truncated": np.array([f == "length" for f in batch.finish_reason]),
        "mixed_steps": np.array([int(m.sum()) for m in batch.mixed_mask]),
        "policy_version": batch.policy_version.numpy().copy(),
    }


class RewardScorerImpl:
    """Plain class (tested without Ray); `RewardScorer` is its Ray actor form."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, mode: str = "last_boxed"):
        self.pool = GradingPool(num_workers=num_workers, timeout_s=timeout_s)
        self.mode = mode

    def score(self, batch: RolloutBatch, golds: Sequence[str], kind: str = "math") -> dict:
        """`golds[g]` is the answer of the call's prompt g; response b is graded against golds[group_index[b]]."""
        gold_per_response = [str(golds[int(g)]) for g in batch.group_index]
        jobs = [GradeJob(text, gold, kind, self.mode) for text, gold in zip(batch.response_text, gold_per_response)]
        before = self.pool.counters()
        results = self.pool.grade(jobs)
        after = self.pool.counters()
        out = rollout_facts(batch)
        out["rewards"] = np.array([r.reward for r in results], dtype=np.float32)
        out["status"] = [r.status for r in results]
        out["extracted"] = [r.extracted for r in results]
        out["grading"] = {key: after[key] - before.get(key, 0) for key in after}
        out["timings"] = dict(batch.timings)
        return out

    def counters(self) -> dict[str, int]:
        return self.pool.counters()

    def close(self) -> None:
        self.pool.close()


SCORER_CPUS = 0.1  # outside the placement plan; counted by the driver's capacity check
RewardScorer = ray.remote(num_cpus=SCORER_CPUS)(RewardScorerImpl)
