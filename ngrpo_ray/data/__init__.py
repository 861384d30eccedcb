"""Data: benchmark and training-set loaders (offline copies, user paths, or the hub), GPQA from a user CSV,
the prompt-length filter, named prompt templates with chat-template rendering, and the CPU demo task."""
from ngrpo_ray.data.arithmetic_task import LEVELS, generate_problems, make_arithmetic_splits
from ngrpo_ray.data.gpqa_loader import load_gpqa_diamond, shuffle_choices
from ngrpo_ray.data.length_filter import filter_by_prompt_length
from ngrpo_ray.data.loaders import (
    load_aime24,
    load_aime25,
    load_aime_train,
    load_amc23,
    load_deepscaler,
    load_hub,
    load_local,
    load_math500,
    load_math_train,
    problems_from_records,
)
from ngrpo_ray.data.problem import LoadReport, Problem
from ngrpo_ray.data.prompts import PROMPT_TEMPLATES, get_template, render_prompt, render_prompt_text
from ngrpo_ray.data.registry import DATA_DIR_ENV, DATASETS, data_root, load_benchmark
from ngrpo_ray.data.repair import has_control_characters, repair_decoded_escapes

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "LEVELS",
    "PROMPT_TEMPLATES",
    "LoadReport",
    "Problem",
    "data_root",
    "filter_by_prompt_length",
    "generate_problems",
    "get_template",
    "has_control_characters",
    "load_aime24",
    "load_aime25",
    "load_aime_train",
    "load_amc23",
    "load_benchmark",
    "load_deepscaler",
    "load_gpqa_diamond",
    "load_hub",
    "load_local",
    "load_math500",
    "load_math_train",
    "make_arithmetic_splits",
    "problems_from_records",
    "render_prompt",
    "render_prompt_text",
    "repair_decoded_escapes",
    "shuffle_choices",
]
