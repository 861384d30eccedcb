"""Grading: math-verify (last \\boxed{} by default, the released code's variants as options) and GPQA letters,
run in killable worker processes with a hard wall-clock limit per answer (GradingPool)."""
from ngrpo_ray.grading.boxed import extract_last_boxed, find_boxed_answers
from ngrpo_ray.grading.gpqa import extract_gpqa_letter, grade_gpqa
from ngrpo_ray.grading.job import GradeJob
from ngrpo_ray.grading.math_grader import MATH_GRADE_MODES, grade_math
from ngrpo_ray.grading.pool import GradingPool
from ngrpo_ray.grading.result import GRADE_STATUSES, GradeResult
from ngrpo_ray.grading.strict_string import normalize_math_string, strict_string_equal

__all__ = [
    "GRADE_STATUSES",
    "MATH_GRADE_MODES",
    "GradeJob",
    "GradeResult",
    "GradingPool",
    "extract_gpqa_letter",
    "extract_last_boxed",
    "find_boxed_answers",
    "grade_gpqa",
    "grade_math",
    "normalize_math_string",
    "strict_string_equal",
]
