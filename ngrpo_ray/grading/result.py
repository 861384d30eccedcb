"""The outcome of grading one answer: a verdict plus why (so no failure becomes a quiet zero)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "relation": the boxed answer is a relation whose left side is not a bare variable (\boxed{43 = 42}): scored 0
GradeStatus = Literal["ok", "no_answer", "parse_error", "timeout", "error", "relation"]
GRADE_STATUSES: tuple[str, ...] = ("ok", "no_answer", "parse_error", "timeout", "error", "relation")


@dataclass(frozen=True)
class GradeResult:
    """correct is True only for status "ok"; every other status is a counted failure of some kind.

    extracted: the answer string that was graded (the boxed content, the GPQA letter, ...), None if nothing was found.
    detail: a short human-readable reason for non-"ok" statuses (exception type, "worker killed", ...).
    """

    correct: bool
    status: GradeStatus
    extracted: str | None = None
    detail: str | None = None

    @property
    def reward(self) -> float:
        return 1.0 if self.correct else 0.0
