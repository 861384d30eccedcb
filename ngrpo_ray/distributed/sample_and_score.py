"""Generate on the fleet and grade where the batches live: the shared step of training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ngrpo_ray.distributed.rollout_fleet import Chunk, RolloutFleet


@dataclass
class Scored:
    chunks: list[Chunk]
    rewards: np.ndarray  # [N] in batch order (chunks concatenated)
    group: np.ndarray  # [N] global prompt index
    sample: np.ndarray  # [N]
    length: np.ndarray
    truncated: np.ndarray
    mixed_steps: np.ndarray
    status: list[str]
    grading: dict[str, int] = field(default_factory=dict)
    cosine: dict[str, float] = field(default_factory=dict)  # mixed-vs-anchor cosine over all chunks
    generation_s: float = 0.0
    tokens: float = 0.0

    def correct_matrix(self, num_prompts: int, n: int) -> np.ndarray:
        out = np.zeros((num_prompts, n), dtype=bool)
        out[self.group, self.sample] = self.rewards > 0.5
        return out


@dataclass
class InFlight:
    """A rollout that was issued and not yet collected: its chunks and the scorer's refs, one per chunk."""
    chunks: list[Chunk]
    scores: list[Any]  # ObjectRefs of the scorer's results
    golds: Sequence[str]
    kind: str


def sample_and_score(fleet: RolloutFleet, scorer: Any, prompts: Sequence[Sequence[int]], golds: Sequence[str],
                     group_size: int, sampling: dict, mixing: Any, policy_version: int, kind: str = "math",
                     purpose: str = "train", call: int | None = None) -> Scored:
    return finish_scoring(fleet, scorer, start_scoring(fleet, scorer, prompts, golds, group_size, sampling, mixing,
                                                       policy_version, kind, purpose, call))


def start_scoring(fleet: RolloutFleet, scorer: Any, prompts: Sequence[Sequence[int]], golds: Sequence[str],
                  group_size: int, sampling: dict, mixing: Any, policy_version: int, kind: str = "math",
                  purpose: str = "train", call: int | None = None) -> InFlight:
    """Issue the rollout and its grading; returns at once (each chunk is scored as soon as it is done)."""
    chunks = fleet.generate(prompts, sampling, mixing, policy_version, group_size, purpose=purpose, call=call)
    return InFlight(chunks, [_score(scorer, c, golds, kind) for c in chunks], golds, kind)


def _score(scorer: Any, chunk: Chunk, golds: Sequence[str], kind: str) -> Any:
    return scorer.score.remote(chunk.ref, list(golds[chunk.first_prompt: chunk.first_prompt + chunk.num_prompts]),
                               kind)


def finish_scoring(fleet: RolloutFleet, scorer: Any, flight: InFlight) -> Scored:
    """Wait for an issued rollout's grades. `collect` re-issues the chunks of an engine that died and returns the
    chunks whose refs are valid (the trainer gets those)."""
    chunks, parts = fleet.collect(flight.chunks, lambda c: _score(scorer, c, flight.golds, flight.kind),
                                  submitted=flight.scores)
    grading: dict[str, int] = {}
    for p in parts:
        for key, value in p["grading"].items():
            grading[key] = grading.get(key, 0) + int(value)
    cat = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    return Scored(
        cosine=_merge_cosine([p["timings"] for p in parts]),
        chunks=chunks,
        rewards=cat("rewards"),
        group=np.concatenate([p["group_index"] + c.first_prompt for p, c in zip(parts, chunks)]),
        sample=cat("sample_index"),
        length=cat("length"),
        truncated=cat("truncated"),
        mixed_steps=cat("mixed_steps"),
        status=[s for p in parts for s in p["status"]],
        grading=grading,
        # engines run in parallel: the slowest chunk bounds the wall time; tokens add up
        generation_s=max(float(p["timings"].get("generation_s", 0.0)) for p in parts),
        tokens=sum(float(p["timings"].get("tokens", 0.0)) for p in parts),
    )


def _merge_cosine(timings: list[dict]) -> dict[str, float]:
    parts = [t for t in timings if t.get("mix_cosine_count", 0) > 0]
    n = sum(t["mix_cosine_count"] for t in parts)
    if not n:
        return {}
    return {
        "mean": sum(t["mix_cosine_cosine_mean"] * t["mix_cosine_count"] for t in parts) / n,
        "min": min(t["mix_cosine_cosine_min"] for t in parts),
        "frac_below_0.95": sum(t["mix_cosine_cosine_frac_below"] * t["mix_cosine_count"] for t in parts) / n,
        "count": float(n),
    }
