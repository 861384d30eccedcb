import pytest

from ngrpo_ray.grading import extract_gpqa_letter, grade_gpqa


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Let me think.\nAnswer: B", "B"),
        (r"... so it is \boxed{C}", "C"),
        ("final answer: d", "D"),
        ("The reasoning is long.\n\nA", "A"),  # a lone letter at the end
        ("Answer：C", "C"),  # full-width colon
        # pattern order: \boxed beats "Answer:" even though "Answer: A" comes later
        (r"\boxed{B} ... Answer: A", "B"),
        # "Answer:" beats a trailing lone letter
        ("Answer: C, not D", "C"),
        # the last match of the first matching pattern wins
        ("Answer: A. Hmm, actually Answer: D", "D"),
        # only standalone letters count: "Bob" and "CD" are not answers; the lone "A" is
        ("Bob said CD is A good choice because", "A"),
        ("no choice letters here", None),
    ],
)
def test_extract_gpqa_letter(text, letter):
    assert extract_gpqa_letter(text) == letter


def test_only_the_last_500_characters_are_searched():
    text = "Answer: B\n" + "x" * 600
    assert extract_gpqa_letter(text) is None
    assert extract_gpqa_letter("Answer: B\n" + "x" * 400) == "B"


def test_grade_gpqa_statuses():
    assert grade_gpqa("Answer: b", "B").correct is True
    wrong = grade_gpqa("Answer: C", "B")
    assert (wrong.correct, wrong.status, wrong.extracted) == (False, "ok", "C")
    assert grade_gpqa("I do not know", "B").status == "no_answer"
    assert grade_gpqa("Answer: B", "E").status == "error"
