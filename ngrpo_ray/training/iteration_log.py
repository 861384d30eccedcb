"""Per-iteration series kept by the driver: the progress line, best-checkpoint selection, and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ngrpo_ray.tracking.plots import line_plot, stacked_bars

PLOTTED = ("reward/mean", "accuracy", "val/mean_at_n", "mixing/mixed_token_fraction", "train/kl_mean",
           "train/clip_frac", "mixing/cosine_mean", "response_length/mean", "time/generation_s", "time/reward_s", "time/train_s",
           "time/sync_s", "val/mean_at_n_ci_low", "val/mean_at_n_ci_high")


class IterationLog:
    def __init__(self, series: dict[str, list] | None = None):
        self.series: dict[str, list] = {k: list(v) for k, v in (series or {}).items()}

    def add(self, step: int, metrics: dict[str, float]) -> None:
        for key in PLOTTED:
            if key in metrics and not math.isnan(metrics[key]):
                self.series.setdefault(key, []).append([step, float(metrics[key])])

    def last(self) -> dict[str, float]:
        return {k: v[-1][1] for k, v in self.series.items() if v}

    @staticmethod
    def update_best(state: Any, metric: str, step: int, metrics: dict[str, float]) -> bool:
        """True when `metric` is present and beats the best so far (higher is better)."""
        value = metrics.get(metric.replace("@", "_at_"))
        if value is None or math.isnan(value):
            return False
        if state.best_value is None or value > state.best_value:
            state.best_value, state.best_iteration = float(value), step
            return True
        return False

    @staticmethod
    def line(step: int, m: dict[str, float]) -> str:
        parts = [f"iter {step:4d}", f"reward {m.get('reward/mean', float('nan')):.3f}",
                 f"acc {m.get('accuracy', float('nan')):.3f}",
                 f"mixed {m.get('mixing/mixed_token_fraction', float('nan')):.3f}",
                 f"len {m.get('response_length/mean', float('nan')):.0f}"]
        if "mismatch/abs_diff_max" in m:  # engine-vs-trainer log-prob gap (max |diff|), and what the correction did
            parts.append(f"gap {m['mismatch/abs_diff_max']:.1e}")
        for key, word in (("rollout_correction/capped_fraction", "capped"), ("rollout_correction/masked_fraction",
                                                                            "masked")):
            if key in m:
                parts.append(f"{word} {m[key]:.1%}")
        if "dynamic_sampling/groups_drawn" in m:  # groups with signal kept / drawn, padding, refill rounds
            parts.append(f"groups {m['dynamic_sampling/groups_kept']:.0f}/{m['dynamic_sampling/groups_drawn']:.0f} "
                         f"kept, {m['dynamic_sampling/groups_padded']:.0f} padded, "
                         f"{m['dynamic_sampling/refill_rounds']:.0f} refills")
        if "staleness/mean" in m:  # asynchronous rollouts: versions behind the trainer, share dropped
            parts.append(f"stale {m['staleness/mean']:.1f}" + (f" ({m['staleness/dropped_fraction']:.0%} dropped)"
                                                               if m.get("staleness/dropped_fraction") else ""))
        if "val/mean_at_n" in m:
            parts.append(f"val mean@n {m['val/mean_at_n']:.3f}")
        parts.append(f"{m.get('time/total_s', float('nan')):.0f}s (gen {m.get('time/generation_s', 0):.0f} / "
                     f"train {m.get('time/train_s', 0):.0f} / sync {m.get('time/sync_s', 0):.1f})")
        return " | ".join(parts)

    def plots(self, folder: Path) -> list[Path]:
        s = self.series
        out = [line_plot(folder / "reward.png", "training reward and accuracy",
                         {k: s.get(k, []) for k in ("reward/mean", "accuracy")}, ylabel="fraction")]
        if s.get("val/mean_at_n"):
            bands = [(x, lo, hi) for (x, lo), (_, hi) in zip(s.get("val/mean_at_n_ci_low", []),
                                                              s.get("val/mean_at_n_ci_high", []))]
            out.append(line_plot(folder / "validation.png", "held-out Mean@n (95% interval)",
                                 {"val/mean_at_n": s["val/mean_at_n"]}, ylabel="Mean@n",
                                 bands={"val/mean_at_n": bands}))
        out.append(line_plot(folder / "mixing.png", "mixing: mixed-token fraction and mixed-vs-anchor cosine",
                             {"mixed_token_fraction": s.get("mixing/mixed_token_fraction", []),
                              "mixed_vs_anchor_cosine_mean": s.get("mixing/cosine_mean", [])}, ylabel="value"))
        timing = {k.split("/")[1][:-2]: [v for _, v in s.get(k, [])]
                  for k in ("time/generation_s", "time/reward_s", "time/train_s", "time/sync_s") if s.get(k)}
        if timing:
            out.append(stacked_bars(folder / "timing.png", "time per iteration", timing))
        return out
