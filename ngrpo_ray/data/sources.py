"""Resolve a config's data name to problems: the demo task, a named benchmark, or a local file with a field mapping."""

from __future__ import annotations

from pathlib import Path

from ngrpo_ray.data.arithmetic_task import make_arithmetic_splits
from ngrpo_ray.data.loaders import load_local
from ngrpo_ray.data.problem import LoadReport, Problem
from ngrpo_ray.data.registry import DATASETS, load_benchmark

# The demo task's fixed sizes: the held-out split is generated first from its own stream, so it never changes.
DEMO_TRAIN_SIZE = 2000
DEMO_HELDOUT_SIZE = 64
DEMO_LEVELS = (1,)  # SmolLM2-135M solves ~5% of level-1 and almost none of level 2+ (see the README)
DEMO_NAMES = ("arithmetic_demo", "arithmetic_demo_heldout")


def load_problems(name: str, question_field: str = "problem", answer_field: str = "answer",
                  seed: int = 0) -> tuple[list[Problem], LoadReport]:
    if name in DEMO_NAMES:
        train, heldout = make_arithmetic_splits(DEMO_TRAIN_SIZE, DEMO_HELDOUT_SIZE, seed=seed, levels=DEMO_LEVELS)
        problems = train if name == "arithmetic_demo" else heldout
        return problems, LoadReport(source=name, path=f"generated (seed {seed})", rows_read=len(problems), kept=len(problems))
    if name in DATASETS:
        return load_benchmark(name)
    path = Path(name).expanduser()
    if path.exists():
        return load_local(path, question_field, answer_field)
    known = ", ".join([*DEMO_NAMES, *DATASETS])
    raise ValueError(f"data source '{name}' is neither a known name ({known}) nor an existing file")


def grader_kind(name: str) -> str:
    """'gpqa' for multiple-choice sets, else 'math'."""
    return DATASETS[name].grading if name in DATASETS else "math"
