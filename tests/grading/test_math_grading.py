import time

import pytest

from ngrpo_ray.grading import grade_math, normalize_math_string, strict_string_equal


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\boxed{\dfrac12}", "1/2"),
        (r"\boxed{0.5}", "1/2"),
        (r"\boxed{\frac{2}{4}}", "1/2"),
        (r"\boxed{\frac{1}{2}}", r"\frac12"),
        (r"so \boxed{025}", "25"),  # AIME style on either side
        (r"so \boxed{25}", "025"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
    ],
)
def test_equivalent_answers_are_correct(pred, gold):
    result = grade_math("Reasoning... " + pred, gold)
    assert (result.correct, result.status) == (True, "ok")


@pytest.mark.parametrize("pred, gold", [(r"\boxed{6}", "5"), (r"\boxed{\frac{1}{3}}", "1/2"), (r"\boxed{24}", "025")])
def test_wrong_answers_are_ok_but_incorrect(pred, gold):
    result = grade_math(pred, gold)
    assert (result.correct, result.status) == (False, "ok")


def test_only_the_last_box_counts():
    assert grade_math(r"\boxed{5} no wait \boxed{6}", "5").correct is False
    assert grade_math(r"\boxed{6} no wait \boxed{5}", "5").correct is True


def test_statuses_for_missing_and_unparseable_answers():
    missing = grade_math("The answer is 5.", "5")
    assert (missing.correct, missing.status, missing.extracted) == (False, "no_answer", None)
    broken = grade_math(r"\boxed{\frac{}{}}", "5")
    assert (broken.correct, broken.status) == (False, "parse_error")
    bad_gold = grade_math(r"\boxed{5}", r"\frac{}{}")
    assert (bad_gold.correct, bad_gold.status) == (False, "error")


def test_whole_response_mode_finds_unboxed_answers():
    # The released code's DeepScaleR/AIME/AMC grading: math-verify on the whole response.
    assert grade_math("The answer is 0.5", "1/2", "whole_response").correct is True
    assert grade_math("The answer is 0.5", "1/2", "last_boxed").status == "no_answer"
    assert grade_math("nothing numeric here", "1/2", "whole_response").status == "no_answer"


def test_strict_string_mode():
    assert grade_math(r"\boxed{\dfrac{1}{2}}", r"\frac12", "strict_string").correct is True
    assert grade_math(r"\boxed{x = 3}", "3", "strict_string").correct is True
    assert grade_math(r"\boxed{0.50}", r"\frac{1}{2}", "strict_string").correct is False  # math-verify would accept
    assert grade_math(r"\boxed{0.50}", r"\frac{1}{2}", "last_boxed").correct is True
    assert normalize_math_string(r"\left( 3, \tfrac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert strict_string_equal("025", "25")


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown math grading mode"):
        grade_math(r"\boxed{1}", "1", "exact")


def test_power_tower_times_out_in_process():
    # math-verify's own alarm catches this one in a main thread; the pool tests cover hangs that ignore the alarm.
    start = time.monotonic()
    result = grade_math(r"\boxed{5^{5^{5^{5}}}}", "5", timeout_s=1)
    assert (result.correct, result.status) == (False, "timeout")
    assert time.monotonic() - start < 4.0


def test_in_thread_grading_with_a_timeout_is_refused_loudly():
    import threading

    errors = []

    def run():
        try:
            grade_math(r"\boxed{1}", "1")
        except RuntimeError as exc:
            errors.append(str(exc))
        errors.append(grade_math(r"\boxed{1}", "1", timeout_s=None).correct)  # no alarm: allowed anywhere

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert "main thread" in errors[0] and errors[1] is True
