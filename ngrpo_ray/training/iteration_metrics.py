"""The metrics one training iteration logs, from its scored rollout, advantage counts, update and weight sync.
This module imports no Ray."""

from __future__ import annotations

from typing import Any


def iteration_metrics(scored: Any, adv_info: dict, train_metrics: dict, sent: Any, recv_stats: list,
                      policy_version: int, t_rollout: float, t_train: float, t_sync: float) -> dict[str, float]:
    """`scored`: a `sample_and_score.Scored` (rewards, lengths, mixing counts in batch order); `sent` / `recv_stats`:
    the trainer's and the engines' weight-sync stats; `t_*`: wall seconds of the rollout (with grading), the update
    and the sync."""
    rewards = scored.rewards
    metrics: dict[str, float] = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
        "accuracy": float((rewards > 0.5).mean()),
        "response_length/mean": float(scored.length.mean()), "response_length/max": float(scored.length.max()),
        "truncated_fraction": float(scored.truncated.mean()),
        "mixing/mixed_token_fraction": float(scored.mixed_steps.sum() / max(scored.length.sum(), 1)),
        "mixing/responses_mixed_fraction": float((scored.mixed_steps > 0).mean()),
        "policy_version": float(policy_version),
        "rollout/tokens_per_s": scored.tokens / max(scored.generation_s, 1e-9),
        "time/generation_s": scored.generation_s, "time/reward_s": max(t_rollout - scored.generation_s, 0.0),
        "time/train_s": t_train, "time/sync_s": t_sync,
        "sync/bytes": float(sent.get("bytes", 0) if isinstance(sent, dict) else 0),
    }
    has_mix = scored.mixed_steps > 0
    metrics["reward/mixed_responses"] = float(rewards[has_mix].mean()) if has_mix.any() else float("nan")
    metrics["reward/unmixed_responses"] = float(rewards[~has_mix].mean()) if (~has_mix).any() else float("nan")
    for key, value in scored.cosine.items():
        metrics[f"mixing/cosine_{key}"] = value
    for key, value in scored.grading.items():
        metrics[f"grading/{key}"] = float(value)
    metrics.update(adv_info)
    for key, value in train_metrics.items():
        if isinstance(value, (int, float)):  # "mismatch/...", "rollout_correction/..." keep their own section
            metrics[key if "/" in key else f"train/{key}"] = float(value)
    if isinstance(sent, dict):  # the trainer ranks' peak memory during the sync (training.peak_memory)
        metrics.update({k: float(v) for k, v in sent.items() if k.startswith("memory/")})
    if recv_stats and isinstance(recv_stats[0], dict) and "engine_load_seconds" in recv_stats[0]:
        metrics["sync/engine_load_s"] = float(recv_stats[0]["engine_load_seconds"])
    return metrics
