"""A data source as token-id prompts: rendered with the prompt template, the over-long ones dropped and counted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ngrpo_ray.config import Config
from ngrpo_ray.data.prompts import render_prompt
from ngrpo_ray.data.sources import grader_kind, load_problems


@dataclass
class PromptSet:
    name: str
    prompts: list[list[int]]
    golds: list[str]
    ids: list[str]
    kind: str
    dropped_too_long: int


def build_prompt_set(cfg: Config, name: str, tokenizer: Any) -> PromptSet:
    problems, report = load_problems(name, cfg.data.question_field, cfg.data.answer_field, seed=cfg.data.seed)
    append = {"auto": None, "always": True, "never": False}[cfg.data.append_think]
    prompts, golds, ids, dropped = [], [], [], 0
    for p in problems:
        ids_ = render_prompt(tokenizer, p.question, cfg.data.prompt_template, cfg.data.use_chat_template, append)
        if len(ids_) > cfg.data.max_prompt_tokens:
            dropped += 1  # counted and logged, never silent
            continue
        prompts.append(ids_)
        golds.append(p.answer)
        ids.append(p.id)
    if cfg.data.limit is not None:
        prompts, golds, ids = prompts[: cfg.data.limit], golds[: cfg.data.limit], ids[: cfg.data.limit]
    if not prompts:
        raise ValueError(f"data source '{name}' has no usable prompts ({report}; {dropped} over "
                         f"data.max_prompt_tokens={cfg.data.max_prompt_tokens})")
    return PromptSet(name, prompts, golds, ids, grader_kind(name), dropped)
