"""One unit of grading work sent to a pool worker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ngrpo_ray.grading.gpqa import grade_gpqa
from ngrpo_ray.grading.math_grader import MATH_GRADE_MODES, grade_math
from ngrpo_ray.grading.result import GradeResult


@dataclass(frozen=True)
class GradeJob:
    """kind "math": pred_text graded against gold with mode (see grade_math); kind "gpqa": gold is a letter A-D."""

    pred_text: str
    gold: str
    kind: Literal["math", "gpqa"] = "math"
    mode: str = "last_boxed"

    def __post_init__(self) -> None:
        if self.kind not in ("math", "gpqa"):
            raise ValueError(f"GradeJob.kind must be 'math' or 'gpqa', got {self.kind!r}")
        if self.kind == "math" and self.mode not in MATH_GRADE_MODES:
            raise ValueError(f"GradeJob.mode must be one of {MATH_GRADE_MODES}, got {self.mode!r}")


def run_job(job: GradeJob, inner_timeout_s: int | None) -> GradeResult:
    if job.kind == "gpqa":
        return grade_gpqa(job.pred_text, job.gold)
    return grade_math(job.pred_text, job.gold, job.mode, timeout_s=inner_timeout_s)
