"""The iteration line carries the engine-vs-trainer gap and what the rollout correction did."""

from ngrpo_ray.training.iteration_log import IterationLog

BASE = {"reward/mean": 0.5, "accuracy": 0.4, "mixing/mixed_token_fraction": 0.1, "response_length/mean": 40.0,
        "time/total_s": 12.0}


def test_line_shows_the_gap_and_the_capped_or_masked_share():
    line = IterationLog.line(3, {**BASE, "mismatch/abs_diff_max": 1.7e-5, "rollout_correction/capped_fraction": 0.031})
    assert " | gap 1.7e-05 | capped 3.1% | " in line
    line = IterationLog.line(3, {**BASE, "mismatch/abs_diff_max": 0.48, "rollout_correction/masked_fraction": 0.25})
    assert " | gap 4.8e-01 | masked 25.0% | " in line


def test_line_without_the_metrics_has_no_field():
    line = IterationLog.line(1, BASE)
    assert "gap" not in line and "capped" not in line and "masked" not in line
