"""Evaluation metrics tables, recomputed independently from the per-sample grades."""

import csv
import json
from math import comb

import numpy as np

from ngrpo_ray.evaluation.report import markdown_table, paired_comparison, summarize, write_reports


def _binomial_pass(correct: np.ndarray, k: int) -> float:
    n = correct.shape[1]
    return float(np.mean([1 - comb(n - c, k) / comb(n, k) for c in correct.sum(axis=1)]))


def test_summary_matches_independent_recomputation(tmp_path):
    rng = np.random.default_rng(0)
    correct = rng.random((40, 8)) < rng.random((40, 1))  # per-problem difficulty
    s = summarize(correct, n_resamples=2000)
    assert s["mean@n"]["value"] == correct.mean()
    assert [k for k in s if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@8"]
    for k in (1, 2, 4, 8):
        assert abs(s[f"pass@{k}"]["value"] - _binomial_pass(correct, k)) < 1e-12
        assert s[f"pass@{k}"]["ci_low"] <= s[f"pass@{k}"]["value"] <= s[f"pass@{k}"]["ci_high"]
    assert s["pass@8"]["value"] == correct.any(axis=1).mean()
    assert s["pass@1"]["value"] == s["mean@n"]["value"]

    paths = write_reports({"a": s, "b": summarize(correct[:20], n_resamples=500)}, tmp_path)
    table = json.loads(paths["json"].read_text())
    assert table["average"]["pass@4"]["value"] == (table["a"]["pass@4"]["value"] + table["b"]["pass@4"]["value"]) / 2
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {(r["benchmark"], r["metric"]) for r in rows} >= {("a", "mean@n"), ("b", "pass@8"), ("average", "pass@1")}
    md = paths["md"].read_text()
    assert md.splitlines()[0] == "| benchmark | mean@n | pass@1 | pass@2 | pass@4 | pass@8 |"
    assert f"{100 * s['pass@8']['value']:.1f}" in md


def test_one_correct_of_32_is_pass_at_32_one_and_best_at_32_about_064():
    correct = np.zeros((1, 32), dtype=bool)
    correct[0, 5] = True
    s = summarize(correct, n_resamples=200)
    assert s["pass@32"]["value"] == 1.0
    assert abs(s["bootstrap_best@32"]["value"] - 0.64) < 0.03


def test_paired_comparison_counts():
    a = np.array([[1, 0], [0, 0], [1, 1], [0, 0]], dtype=bool)
    b = np.array([[0, 0], [1, 0], [1, 0], [0, 0]], dtype=bool)
    out = paired_comparison(a, b, problem_ids=["p0", "p1", "p2", "p3"])
    assert out["solved_only_a"] == ["p0"] and out["solved_only_b"] == ["p1"]
    assert (out["solved_both"], out["solved_neither"]) == (1, 1)
    assert abs(out["mean_diff"]["value"] - (3 / 8 - 2 / 8)) < 1e-12


def test_markdown_handles_missing_cells():
    md = markdown_table({"x": {"mean@n": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}})
    assert "50.0 [40.0, 60.0]" in md
