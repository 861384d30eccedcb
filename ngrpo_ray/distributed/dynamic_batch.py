"""Dynamic sampling on the fleet (algorithm.dynamic_sampling): rounds of sample_and_score until the batch holds
trainer.prompts_per_iteration groups with non-zero reward variance; the rules live in training/dynamic_sampling.py.

The driver still holds only refs and small arrays: a chunk whose groups are all kept is passed on as is, one with
some groups dropped is cut by a small Ray task next to the batch (`_take_groups`), never fetched here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ngrpo_ray.config import Config
from ngrpo_ray.distributed.sample_and_score import Scored, sample_and_score
from ngrpo_ray.training.dynamic_sampling import (REFILL_CALL_STRIDE, FilledBatch, fill_batch, refill_prompts,
                                                 select_groups)


@ray.remote(num_cpus=0.1)
def _take_groups(batch: Any, groups: list[int]) -> Any:
    return select_groups(batch, groups)


def sample_with_signal(cfg: Config, fleet: Any, scorer: Any, train_set: Any, first_batch: list[int], iteration: int,
                       sampling: dict, mixing: Any, version: int, log_dir: Path | None = None,
                       ) -> tuple[Scored, dict[str, float]]:
    """One training batch of exactly B groups (kept groups first in draw order, padding if the rounds ran out), and
    its dynamic_sampling/* metrics. `train_set`: prompts, golds, ids, kind (driver.PromptSet); `iteration` 0-based."""
    G = cfg.rollout.group_size
    rounds: list[Scored] = []

    def draw(round_: int, problems: list[int]) -> np.ndarray:
        scored = sample_and_score(fleet, scorer, [train_set.prompts[i] for i in problems],
                                  [train_set.golds[i] for i in problems], G, sampling, mixing, version, train_set.kind,
                                  call=version + round_ * REFILL_CALL_STRIDE)
        if not np.array_equal(scored.group, np.repeat(np.arange(len(problems)), G)):
            raise RuntimeError("dynamic sampling needs each group's responses contiguous, in prompt order")
        rounds.append(scored)
        return scored.rewards

    def refill(start: int, count: int) -> list[int]:
        return refill_prompts(len(train_set.prompts), first_batch, cfg.trainer.seed, iteration, start, count)

    filled = fill_batch(cfg.trainer.prompts_per_iteration, G, cfg.algorithm.max_resample_rounds, draw, first_batch,
                        refill)
    metrics = filled.metrics()
    metrics["dynamic_sampling/drawn_reward_mean"] = float(np.concatenate([s.rewards for s in rounds]).mean())
    if log_dir is not None:  # which problems each round drew and which groups trained (resume audits)
        with (Path(log_dir) / "dynamic_sampling.jsonl").open("a") as f:
            f.write(json.dumps({"iteration": iteration + 1,
                                "rounds": [[train_set.ids[i] for i in r] for r in filled.problems],
                                "picks": filled.picks}) + "\n")
    return merge_rounds(rounds, filled, G), metrics


def merge_rounds(rounds: list[Scored], filled: FilledBatch, group_size: int) -> Scored:
    """The picked groups of every round as one Scored, in pick order (round, then group)."""
    chunks, parts = [], []
    for k, scored in enumerate(rounds):
        groups = sorted(g for r, g in filled.picks if r == k)
        if not groups:
            continue
        for c in scored.chunks:
            local = [g - c.first_prompt for g in groups if c.first_prompt <= g < c.first_prompt + c.num_prompts]
            if len(local) == c.num_prompts:
                chunks.append(c)
            elif local:
                chunks.append(dataclasses.replace(c, ref=_take_groups.remote(c.ref, local), num_prompts=len(local)))
        rows = np.isin(scored.group, groups)
        parts.append((scored, rows))
    cat = lambda key: np.concatenate([getattr(s, key)[rows] for s, rows in parts])  # noqa: E731
    grading: dict[str, int] = {}
    for s in rounds:  # every graded response counts, kept or not
        for key, value in s.grading.items():
            grading[key] = grading.get(key, 0) + int(value)
    return Scored(
        chunks=chunks, rewards=cat("rewards"), group=np.repeat(np.arange(len(filled.picks)), group_size),
        sample=cat("sample"), length=cat("length"), truncated=cat("truncated"), mixed_steps=cat("mixed_steps"),
        status=[st for s, rows in parts for st, keep in zip(s.status, rows) if keep], grading=grading,
        cosine=_merge_cosine([s.cosine for s in rounds]),
        generation_s=sum(s.generation_s for s in rounds),  # rounds run one after another
        tokens=sum(s.tokens for s in rounds))


def _merge_cosine(parts: list[dict]) -> dict[str, float]:
    parts = [p for p in parts if p.get("count")]
    n = sum(p["count"] for p in parts)
    if not n:
        return {}
    return {"mean": sum(p["mean"] * p["count"] for p in parts) / n, "min": min(p["min"] for p in parts),
            "frac_below_0.95": sum(p["frac_below_0.95"] * p["count"] for p in parts) / n, "count": float(n)}
