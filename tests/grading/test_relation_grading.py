"""A boxed relation is an answer only when its left side is a bare variable (math-verify alone grades the right side
of any equation, so \\boxed{43 = 42} would score 1 against 42)."""
import pytest

from ngrpo_ray.grading import grade_math
from ngrpo_ray.grading.relation import is_unanswered_relation


@pytest.mark.parametrize(
    "pred, correct, status",
    [
        (r"\boxed{43 = 42}", False, "relation"),  # math-verify alone: 1
        (r"\boxed{x^{x^{x}} = 42}", False, "relation"),  # math-verify alone: 1
        (r"\boxed{x = 43 = 42}", False, "relation"),  # a chain hides the same trick behind a variable
        (r"\boxed{f(x) = 42}", False, "relation"),
        (r"\boxed{x = 42}", True, "ok"),
        (r"\boxed{42}", True, "ok"),
        (r"\boxed{x = 41}", False, "ok"),
    ],
)
@pytest.mark.parametrize("mode", ["last_boxed", "strict_string"])
def test_boxed_relations_against_gold_42(pred, correct, status, mode):
    result = grade_math("So " + pred, "42", mode)
    assert (result.correct, result.status) == (correct, status)
    assert result.reward == float(correct)


def test_subscripted_and_greek_variables_are_bare():
    # last_boxed only: strict_string's released normalisation strips a left side of at most 2 characters
    assert grade_math(r"\boxed{a_{1} = 42}", "42").correct is True
    assert grade_math(r"\boxed{\theta \approx 42}", "42").correct is True


def test_whole_response_mode_applies_the_rule_to_the_last_box():
    assert grade_math(r"thus \boxed{43 = 42}", "42", "whole_response").status == "relation"
    assert grade_math(r"thus \boxed{x = 42}", "42", "whole_response").correct is True


def test_a_relation_gold_keeps_relation_answers():
    # MATH-500's plane: the gold is itself a relation, so math-verify compares the two equations.
    plane = "5x - 7y + 11z + 4 = 0"
    assert grade_math(r"\boxed{10x - 14y + 22z + 8 = 0}", plane).correct is True
    assert grade_math(r"\boxed{x \in [-2,7]}", r"x \in [-2,7]").correct is True
    assert grade_math(r"\boxed{y = 2x + 3}", "y = 2x + 3").correct is True


@pytest.mark.parametrize("content, refused", [
    ("43 = 42", True), ("42 = x", True), ("2x + 3 = 7", True), ("0 < x < 1", True), (r"x \le 3, 4 = 5", True),
    ("x = 42", False), ("x = y = 42", False), (r"\theta \approx 0.5", False), ("(x, y) = (1, 2)", False),
    (r"x \in [-2, 7]", False), (r"x\le42", False), ("x = 1, y = 2", False), ("x' = 3", False),
    (r"\left( 3, \frac{\pi}{2} \right)", False), (r"\left(\frac{3}{5},\frac{8}{3}\right]", False),
    (r"\{1, 2\}", False), (r"\frac{a=b}{2}", False), ("1,000", False), ("42", False),
])
def test_relation_detection(content, refused):
    assert is_unanswered_relation(content) is refused
