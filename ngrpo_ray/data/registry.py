"""Benchmarks and training sets by name: `load_benchmark("aime24")` reads the shared offline copy, a user path
overrides it, and `hub=True` asks `datasets.load_dataset` instead (only where a hub is reachable)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ngrpo_ray
from ngrpo_ray.data import loaders
from ngrpo_ray.data.gpqa_loader import load_gpqa_diamond
from ngrpo_ray.data.problem import LoadReport, Problem

DATA_DIR_ENV = "NGRPO_DATA_DIR"

Loader = Callable[[Path], "tuple[list[Problem], LoadReport]"]


@dataclass(frozen=True)
class DatasetSpec:
    relative_path: str | None  # under the data root; None: the user must supply a path (GPQA) or use the hub
    loader: Loader
    grading: str  # "math" or "gpqa": which grader the answers need
    hub: tuple[str, str, str, str] | None = None  # (name, split, question_field, answer_field)
    prompt_template: str = "r1"  # the paper's instruction; GPQA uses its own answer format
    released_code_math_mode: str = "whole_response"  # the authors' code grades MATH-500 by strict string match


# Hub names and fields are the public datasets the offline copies were made from; they could not be checked
# offline here, and are only used with hub=True.
_H = DatasetSpec
DATASETS: dict[str, DatasetSpec] = {
    "math500": _H(
        "math500/test.jsonl", loaders.load_math500, "math", ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
        released_code_math_mode="strict_string",
    ),
    "aime24": _H(
        "aime24/test.json", loaders.load_aime24, "math", ("HuggingFaceH4/aime_2024", "train", "problem", "answer")
    ),
    "aime25": _H("aime25/test.json", loaders.load_aime25, "math", ("math-ai/aime25", "test", "problem", "answer")),
    "amc23": _H("amc23/test.json", loaders.load_amc23, "math", ("math-ai/amc23", "test", "question", "answer")),
    "math_train": _H("train/math_train.json", loaders.load_math_train, "math"),
    "aime_train": _H("train/aime_1983_2023.json", loaders.load_aime_train, "math"),
    "deepscaler": _H(
        None, loaders.load_deepscaler, "math", (loaders.DEEPSCALER_HUB_NAME, "train", "problem", "answer")
    ),
    "gpqa_diamond": _H(None, load_gpqa_diamond, "gpqa", prompt_template="gpqa"),
}


def data_root() -> Path:
    """$NGRPO_DATA_DIR, else ../shared/data next to the repository (the repo root is the parent of ngrpo_ray/)."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser()
    repo_root = Path(ngrpo_ray.__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"


def load_benchmark(name: str, path: str | Path | None = None, *, hub: bool = False) -> tuple[list[Problem], LoadReport]:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name}: data file not found: {path}")
        return spec.loader(path)
    if hub:
        if spec.hub is None:
            raise ValueError(f"{name} has no hub name here; pass a local path")
        hub_name, split, question_field, answer_field = spec.hub
        return loaders.load_hub(hub_name, split, question_field, answer_field, source=name)
    if name == "gpqa_diamond":
        raise ValueError("gpqa_diamond is loaded only from a path you supply (the official CSV); pass path=...")
    if spec.relative_path is None:
        raise ValueError(f"{name}: pass a local path (json/jsonl/parquet) or hub=True")
    full = data_root() / spec.relative_path
    if not full.exists():
        raise FileNotFoundError(
            f"{name}: data file not found: {full} (set {DATA_DIR_ENV} to the folder holding "
            f"{spec.relative_path}, pass path=..., or use hub=True where a hub is reachable)"
        )
    return spec.loader(full)
