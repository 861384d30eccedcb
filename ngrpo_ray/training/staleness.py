"""The staleness rule of asynchronous rollouts: how many policy versions a sample is behind the trainer, and which
samples may be trained on. This module imports no Ray.

A sample drawn with policy version ``v`` and trained on by a trainer at version ``V`` has staleness ``V - v``
(one-step-off rollouts: 0 for a rollout issued and collected in the same iteration, 1 for one generated during the
previous update). A sample with staleness above ``max_staleness`` is dropped; a negative staleness (a sample from a
policy the trainer has not reached, e.g. after the trainer rolled back to a checkpoint) is an error, never trained on.
"""

from __future__ import annotations

import numpy as np


def staleness(sample_versions: np.ndarray, trainer_version: int) -> np.ndarray:
    """[N] int64: trainer_version - the version each sample was drawn with."""
    out = int(trainer_version) - np.asarray(sample_versions, dtype=np.int64)
    if (out < 0).any():
        newest = int(np.asarray(sample_versions).max())
        raise ValueError(f"a sample was drawn with policy version {newest}, newer than the trainer's "
                         f"{trainer_version}: it cannot be trained on")
    return out


def keep_mask(sample_versions: np.ndarray, trainer_version: int, max_staleness: int) -> np.ndarray:
    """[N] bool: the samples at most ``max_staleness`` versions behind the trainer."""
    if max_staleness < 1:
        raise ValueError(f"max_staleness must be >= 1, got {max_staleness}")
    return staleness(sample_versions, trainer_version) <= max_staleness


def staleness_metrics(sample_versions: np.ndarray, trainer_version: int, kept: np.ndarray) -> dict[str, float]:
    """``staleness/...``: mean and max over the drawn samples, and the fraction dropped."""
    s = staleness(sample_versions, trainer_version)
    return {"staleness/mean": float(s.mean()), "staleness/max": float(s.max()),
            "staleness/dropped_fraction": float((~np.asarray(kept, dtype=bool)).mean())}
