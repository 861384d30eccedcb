"""Grade one math answer with math-verify 0.9, in the calling process.

math-verify's own timeouts use signal.alarm, which works only in a process's main thread: call grade_math from a
main thread (the GradingPool workers do) or pass timeout_s=None and enforce a limit from outside. Some inputs hang
even with the alarm, which is why training and evaluation grade through GradingPool, never directly.
"""
from __future__ import annotations

import threading
from functools import lru_cache
from typing import Literal

from ngrpo_ray.grading.boxed import extract_last_boxed
from ngrpo_ray.grading.relation import relation_refused
from ngrpo_ray.grading.result import GradeResult
from ngrpo_ray.grading.strict_string import strict_string_equal

MathGradeMode = Literal["last_boxed", "whole_response", "strict_string"]
MATH_GRADE_MODES: tuple[str, ...] = ("last_boxed", "whole_response", "strict_string")


def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return LatexExtractionConfig(), ExprExtractionConfig()


def _parse(text: str, timeout_s: int | None, pred_first_expr: bool = False) -> list:
    """math-verify parse that raises on errors and timeouts instead of returning [] silently."""
    from math_verify import parse

    latex, expr = _configs()
    config = [expr, latex] if pred_first_expr else [latex, expr]
    return parse(text, extraction_config=config, parsing_timeout=timeout_s, raise_on_error=True)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple:
    # Gold answers are bare LaTeX ("\frac{1}{2}", "025"); a box makes the LaTeX extractor take all of it.
    wrapped = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
    return tuple(_parse(wrapped, timeout_s))


def _is_timeout(exc: BaseException) -> bool:
    from math_verify.errors import TimeoutException

    return isinstance(exc, TimeoutException) or isinstance(exc.__cause__, TimeoutException)


def _reraise_interrupts(exc: BaseException) -> None:
    if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _verify_any(gold_parsed: tuple, pred_parsed: list, timeout_s: int | None, extracted: str) -> GradeResult:
    """True if any (gold, pred) pair verifies. Pairs are checked one by one so that one pair that errors or times out
    does not hide another that verifies; if none verifies, a timeout or error is reported rather than "wrong"."""
    from math_verify import verify

    worst: tuple[str, str] | None = None
    for g in gold_parsed:
        for p in pred_parsed:
            try:
                if verify([g], [p], timeout_seconds=timeout_s, raise_on_error=True):
                    return GradeResult(True, "ok", extracted)
            except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
                _reraise_interrupts(exc)
                status = "timeout" if _is_timeout(exc) else "error"
                if worst is None or (status == "timeout" and worst[0] == "error"):
                    worst = (status, _describe(exc))
    if worst is not None:
        return GradeResult(False, worst[0], extracted, worst[1])  # type: ignore[arg-type]
    if all(isinstance(g, str) for g in gold_parsed):
        return GradeResult(False, "error", extracted, "the gold answer only matched as a raw string")
    if all(isinstance(p, str) for p in pred_parsed):
        # Only math-verify's raw-string fallback came back: sympy could not read the answer.
        return GradeResult(False, "parse_error", extracted, "the answer only matched as a raw string")
    return GradeResult(False, "ok", extracted)


_RELATION_DETAIL = "a boxed relation whose left side is not a bare variable"


def grade_math(pred_text: str, gold: str, mode: str = "last_boxed", timeout_s: int | None = 5) -> GradeResult:
    """Grade a response against a gold answer.

    mode "last_boxed" (the paper): math-verify on the content of the last \\boxed{}.
    mode "whole_response" (the released code for DeepScaleR/AIME/AMC): math-verify extracts from the whole text.
    mode "strict_string" (the released code for MATH-500): normalised string equality of the last boxed content.
    In every mode a last box holding a relation whose left side is not a bare variable (\\boxed{43 = 42}) scores
    0 with status "relation" (grading.relation), unless the gold answer is itself such a relation.
    """
    if mode not in MATH_GRADE_MODES:
        raise ValueError(f"unknown math grading mode {mode!r}; expected one of {MATH_GRADE_MODES}")
    if timeout_s is not None and threading.current_thread() is not threading.main_thread():
        # In a thread math-verify's alarm raises on every call; frameworks that caught that graded everything 0.
        raise RuntimeError(
            "grade_math with a timeout must run in a main thread (math-verify uses signal.alarm); "
            "grade through GradingPool, or pass timeout_s=None and enforce a limit yourself"
        )
    last_box = extract_last_boxed(pred_text)
    if last_box is not None and relation_refused(last_box, str(gold)):
        return GradeResult(False, "relation", last_box, _RELATION_DETAIL)
    if mode == "strict_string":
        if last_box is None:
            return GradeResult(False, "no_answer", None, "no \\boxed{} answer")
        return GradeResult(strict_string_equal(last_box, str(gold)), "ok", last_box)

    try:
        gold_parsed = _parse_gold(str(gold).strip(), timeout_s)
    except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
        _reraise_interrupts(exc)
        return GradeResult(False, "timeout" if _is_timeout(exc) else "error", None, "gold: " + _describe(exc))
    if not gold_parsed:
        return GradeResult(False, "error", None, f"gold answer {gold!r} does not parse")

    if mode == "last_boxed":
        if last_box is None:
            return GradeResult(False, "no_answer", None, "no \\boxed{} answer")
        pred_input, extracted = "\\boxed{" + last_box + "}", last_box
    else:
        pred_input, extracted = pred_text, None
    try:
        pred_parsed = _parse(pred_input, timeout_s, pred_first_expr=(mode == "whole_response"))
    except BaseException as exc:  # noqa: BLE001 - math-verify's TimeoutException is a BaseException
        _reraise_interrupts(exc)
        status = "timeout" if _is_timeout(exc) else "parse_error"
        return GradeResult(False, status, extracted, _describe(exc))  # type: ignore[arg-type]
    if not pred_parsed:
        if mode == "whole_response":
            return GradeResult(False, "no_answer", None, "no extractable answer in the response")
        return GradeResult(False, "parse_error", extracted, "the boxed answer does not parse")
    if extracted is None:
        extracted = str(pred_parsed[-1])
    return _verify_any(gold_parsed, pred_parsed, timeout_s, extracted)
