"""The staleness rule of asynchronous rollouts, on hand-computed version tags: which samples are kept, which dropped,
what is logged, and how a scored rollout loses whole chunks (their groups) and nothing else."""

import numpy as np
import pytest

from ngrpo_ray.distributed.async_rollouts import drop_stale
from ngrpo_ray.distributed.rollout_fleet import Chunk
from ngrpo_ray.distributed.sample_and_score import Scored
from ngrpo_ray.training.staleness import keep_mask, staleness, staleness_metrics


def test_keep_and_drop_by_hand():
    versions = np.array([5, 4, 3, 5, 2])  # trainer at 5: staleness 0, 1, 2, 0, 3
    assert staleness(versions, 5).tolist() == [0, 1, 2, 0, 3]
    assert keep_mask(versions, 5, max_staleness=1).tolist() == [True, True, False, True, False]
    assert keep_mask(versions, 5, max_staleness=2).tolist() == [True, True, True, True, False]
    assert keep_mask(versions, 5, max_staleness=3).all()
    m = staleness_metrics(versions, 5, keep_mask(versions, 5, 1))
    assert m == {"staleness/mean": 6 / 5, "staleness/max": 3.0, "staleness/dropped_fraction": 2 / 5}


def test_one_step_off_pipeline_is_within_the_default_bound():
    # iteration i trains on the rollout issued during iteration i-1 (version i-1) with the trainer at version i;
    # the first iteration's rollout is issued and trained at version 0
    for it in range(5):
        drawn, trainer = max(it - 1, 0), it
        assert staleness(np.array([drawn]), trainer).tolist() == [0 if it == 0 else 1]
        assert keep_mask(np.array([drawn]), trainer, max_staleness=1).all()


def test_newer_than_the_trainer_and_a_zero_bound_are_refused():
    with pytest.raises(ValueError, match="newer than the trainer's 3"):
        staleness(np.array([3, 4]), 3)  # e.g. a rollout from before a trainer rolled back to a checkpoint
    with pytest.raises(ValueError, match="max_staleness must be >= 1"):
        keep_mask(np.array([3]), 3, 0)


def _scored(chunk_versions, prompts_per_chunk=1, G=2):
    chunks = [Chunk(ref=None, first_prompt=i * prompts_per_chunk, num_prompts=prompts_per_chunk, engine=0,
                    request=((), {}, None, v, G, {})) for i, v in enumerate(chunk_versions)]
    n = len(chunks) * prompts_per_chunk * G
    rewards = np.arange(n, dtype=float) / 10
    return Scored(chunks=chunks, rewards=rewards, group=np.arange(n) // G, sample=np.arange(n) % G,
                  length=np.arange(n) + 1, truncated=np.zeros(n, bool), mixed_steps=np.zeros(n, int),
                  status=[f"s{i}" for i in range(n)])


def test_drop_stale_removes_whole_chunks_and_their_rows():
    # three chunks of one prompt x 2 samples, drawn with versions 7, 5, 6; trainer at 7, bound 1: chunk 1 goes
    scored = _scored([7, 5, 6])
    kept, info = drop_stale(scored, trainer_version=7, max_staleness=1, group_size=2)
    assert [c.policy_version for c in kept.chunks] == [7, 6]
    assert kept.rewards.tolist() == [0.0, 0.1, 0.4, 0.5]
    assert kept.group.tolist() == [0, 0, 2, 2] and kept.length.tolist() == [1, 2, 5, 6]
    assert kept.status == ["s0", "s1", "s4", "s5"]
    assert info == {"staleness/mean": (0 + 0 + 2 + 2 + 1 + 1) / 6, "staleness/max": 2.0,
                    "staleness/dropped_fraction": 2 / 6}
    same, info = drop_stale(_scored([6, 6]), 7, 1, 2)  # nothing to drop: the rollout itself comes back
    assert len(same.chunks) == 2 and info["staleness/dropped_fraction"] == 0.0 and info["staleness/mean"] == 1.0
    with pytest.raises(RuntimeError, match="every sample"):
        drop_stale(_scored([4, 5]), 7, 1, 2)
