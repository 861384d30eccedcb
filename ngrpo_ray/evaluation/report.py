"""Turn per-sample grades into the paper's metrics and write them as JSON, CSV and a markdown table.

Input per benchmark: a bool matrix `correct` [problems, n]. Output: Mean@n and unbiased Pass@k for k in
{1, 2, 4, 8, 16, 32} up to n, each with a 95% bootstrap interval over problems, and verl's bootstrap best@k under its
own name (it is a different, biased number; see ../shared/notes/algorithms.md).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ngrpo_ray.core.metrics import (
    bootstrap_best_at_k,
    bootstrap_ci,
    mean_at_n,
    pass_at_k,
    pass_at_k_per_problem,
    paired_bootstrap_ci,
)

PASS_KS = (1, 2, 4, 8, 16, 32)


def summarize(correct: np.ndarray, seed: int = 0, n_resamples: int = 10_000) -> dict:
    correct = np.asarray(correct, dtype=bool)
    problems, n = correct.shape
    c = correct.sum(axis=1)
    out: dict = {"problems": int(problems), "n": int(n)}
    ci = bootstrap_ci(correct.mean(axis=1), seed=seed, n_resamples=n_resamples)
    out["mean@n"] = {"value": mean_at_n(correct), "ci_low": ci.low, "ci_high": ci.high}
    for k in PASS_KS:
        if k > n:
            break
        per_problem = pass_at_k_per_problem(np.full(problems, n), c, k)
        ci = bootstrap_ci(per_problem, seed=seed, n_resamples=n_resamples)
        out[f"pass@{k}"] = {"value": pass_at_k(correct, k), "ci_low": ci.low, "ci_high": ci.high}
        out[f"bootstrap_best@{k}"] = {"value": bootstrap_best_at_k(correct.astype(float), k)}
    return out


def average_row(summaries: dict[str, dict]) -> dict:
    """The unweighted mean over benchmarks of each metric's value (the paper's 'Avg.' column)."""
    keys = set.intersection(*(set(s) - {"problems", "n"} for s in summaries.values())) if summaries else set()
    return {key: {"value": float(np.mean([s[key]["value"] for s in summaries.values()]))} for key in sorted(keys)}


def _metric_order(summary: dict) -> list[str]:
    keys = [k for k in summary if k not in ("problems", "n")]
    rank = {"mean@n": 0}
    return sorted(keys, key=lambda k: (rank.get(k, 1 if k.startswith("pass@") else 2), int(k.split("@")[1]) if "@" in k and k != "mean@n" else 0))


def write_reports(summaries: dict[str, dict], out_dir: str | Path, stem: str = "eval") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = dict(summaries)
    if len(summaries) > 1:
        table["average"] = average_row(summaries)
    paths = {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(table, indent=2))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "metric", "value", "ci_low", "ci_high"])
        for bench, summary in table.items():
            for key in _metric_order(summary):
                cell = summary[key]
                writer.writerow([bench, key, cell["value"], cell.get("ci_low", ""), cell.get("ci_high", "")])
    paths["md"].write_text(markdown_table(table))
    return paths


def markdown_table(table: dict[str, dict]) -> str:
    first = next(iter(table.values()))
    metrics = [k for k in _metric_order(first) if not k.startswith("bootstrap_")]
    lines = ["| benchmark | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for bench, summary in table.items():
        cells = []
        for key in metrics:
            cell = summary.get(key)
            if cell is None:
                cells.append("")
            elif "ci_low" in cell:
                cells.append(f"{100 * cell['value']:.1f} [{100 * cell['ci_low']:.1f}, {100 * cell['ci_high']:.1f}]")
            else:
                cells.append(f"{100 * cell['value']:.1f}")
        lines.append(f"| {bench} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nValues in %, 95% bootstrap intervals over problems in brackets.\n"


def paired_comparison(a: np.ndarray, b: np.ndarray, problem_ids: list[str] | None = None, seed: int = 0) -> dict:
    """Two runs on the same problems (paper appendix E): who solves what (any of n samples correct), and the paired
    bootstrap interval of the Mean@n difference a - b."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired comparison needs the same problems: {a.shape[0]} vs {b.shape[0]}")
    ids = problem_ids or [str(i) for i in range(a.shape[0])]
    solved_a, solved_b = a.any(axis=1), b.any(axis=1)
    diff = paired_bootstrap_ci(a.mean(axis=1), b.mean(axis=1), seed=seed)
    return {
        "problems": int(a.shape[0]),
        "solved_only_a": [ids[i] for i in np.flatnonzero(solved_a & ~solved_b)],
        "solved_only_b": [ids[i] for i in np.flatnonzero(solved_b & ~solved_a)],
        "solved_both": int((solved_a & solved_b).sum()),
        "solved_neither": int((~solved_a & ~solved_b).sum()),
        "mean_diff": {"value": diff.estimate, "ci_low": diff.low, "ci_high": diff.high},
    }
