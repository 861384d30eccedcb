"""Drop prompts longer than a token budget (the paper drops prompts over 4,096 tokens) and count them."""
from __future__ import annotations

from typing import Any, Callable

from ngrpo_ray.data.problem import LoadReport, Problem


def filter_by_prompt_length(
    problems: list[Problem],
    tokenizer: Any,
    max_tokens: int,
    render: Callable[[Problem], list[int]] | None = None,
    report: LoadReport | None = None,
) -> tuple[list[Problem], int]:
    """Keep problems whose prompt has at most max_tokens tokens; returns (kept, number dropped).

    render: the ids the model will actually see (e.g. `lambda p: render_prompt(tok, p.question, "r1")`); by default
    the bare question tokenized without special tokens. report.filtered_too_long and report.kept are updated.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if render is None:
        def render(problem: Problem) -> list[int]:
            return tokenizer(problem.question, add_special_tokens=False)["input_ids"]

    kept = [p for p in problems if len(render(p)) <= max_tokens]
    dropped = len(problems) - len(kept)
    if report is not None:
        report.filtered_too_long += dropped
        report.kept = len(kept)
    return kept, dropped
