import pytest

from ngrpo_ray.grading import extract_last_boxed, find_boxed_answers


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"nested \boxed{\frac{a^{2}}{b_{1}}} end", r"\frac{a^{2}}{b_{1}}"),
        (r"fbox form \fbox{7}", "7"),
        (r"bare form \boxed 5.", "5"),
        (r"bare in math $\boxed 12$ done", "12"),
        (r"space before brace \boxed {9}", "9"),
        (r"escaped braces \boxed{\{1,2\}}", r"\{1,2\}"),
        (r"outer box wins \boxed{\boxed{3}+1}", r"\boxed{3}+1"),
        (r"truncated \boxed{3} and then \boxed{\frac{1", "3"),  # an unclosed box at the end is ignored
        ("no box at all", None),
        (r"empty \boxed{}", None),
        (r"\boxedfoo{3} is another macro", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_find_boxed_answers_in_order():
    assert find_boxed_answers(r"\boxed{a} x \fbox{b} y \boxed c") == ["a", "b", "c"]
