"""GPQA multiple-choice grading with the released code's letter extraction
(ZJUSCL/N-GRPO `verl/utils/reward_score/gpqa_diamond.py`): on the last 500 characters, try the patterns in order and
take the last match of the first pattern that matches."""
from __future__ import annotations

import re

from ngrpo_ray.grading.result import GradeResult

ANSWER_CLIP_CHARS = 500
GPQA_LETTER_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, flags=re.IGNORECASE)
    for p in (
        r"\\boxed\s*\{\s*([ABCD])\s*\}",  # \boxed{C}
        r"(?:final answer|answer)\s*[:：]\s*([ABCD])",  # "Answer: B", "final answer: d"
        r"\b([ABCD])\b(?=[^A-Za-z]*$)",  # a lone letter at the very end
        r"\b([ABCD])\b",  # any standalone A-D
    )
)


def extract_gpqa_letter(text: str | None) -> str | None:
    if text is None:
        return None
    tail = str(text).strip()[-ANSWER_CLIP_CHARS:]
    for pattern in GPQA_LETTER_PATTERNS:
        matches = pattern.findall(tail)
        if matches:
            return matches[-1].upper()
    return None


def grade_gpqa(pred_text: str, gold_letter: str) -> GradeResult:
    gold = str(gold_letter).strip().upper()
    if gold not in ("A", "B", "C", "D"):
        return GradeResult(False, "error", None, f"gold {gold_letter!r} is not a letter A-D")
    letter = extract_gpqa_letter(pred_text)
    if letter is None:
        return GradeResult(False, "no_answer", None, "no A-D letter found")
    return GradeResult(letter == gold, "ok", letter)
