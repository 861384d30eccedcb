"""Paired comparison of two `ngrpo eval` runs on the same problems (paper appendix E): mixing on vs off, or two
checkpoints. Reads each run's grades.jsonl and reports, per benchmark, the problems only one side solves and the
paired bootstrap interval of the Mean@n difference (report.paired_comparison)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ngrpo_ray.evaluation.report import paired_comparison


def grade_matrices(jsonl_path: str | Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """{benchmark: (problem ids in first-seen order, correct [P, n] bool)} from a grades.jsonl."""
    cells: dict[str, dict[str, dict[int, bool]]] = defaultdict(dict)
    for line in Path(jsonl_path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            cells[row["benchmark"]].setdefault(row["problem_id"], {})[int(row["sample"])] = bool(row["correct"])
    out = {}
    for bench, problems in cells.items():
        ids = list(problems)
        n = max(len(s) for s in problems.values())
        if any(sorted(s) != list(range(n)) for s in problems.values()):
            raise ValueError(f"{jsonl_path}: {bench} does not have samples 0..{n - 1} for every problem")
        out[bench] = (ids, np.array([[problems[i][s] for s in range(n)] for i in ids], dtype=bool))
    return out


def compare_runs(grades_a: str | Path, grades_b: str | Path, seed: int = 0) -> dict[str, dict]:
    """Per benchmark present in both runs: paired_comparison(a, b) on the problems both graded (aligned by id)."""
    a, b = grade_matrices(grades_a), grade_matrices(grades_b)
    out = {}
    for bench in sorted(set(a) & set(b)):
        ids_a, ca = a[bench]
        ids_b, cb = b[bench]
        common = [i for i in ids_a if i in set(ids_b)]
        if not common:
            raise ValueError(f"{bench}: the two runs share no problem ids")
        rows_a = [ids_a.index(i) for i in common]
        rows_b = [ids_b.index(i) for i in common]
        out[bench] = paired_comparison(ca[rows_a], cb[rows_b], common, seed=seed)
    return out
