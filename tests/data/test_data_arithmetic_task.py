import random
import re

import pytest

from ngrpo_ray.data import LEVELS, generate_problems, make_arithmetic_splits
from ngrpo_ray.data.arithmetic_task import generate_problem
from ngrpo_ray.grading import grade_math


def test_deterministic_from_the_seed():
    a_train, a_test = make_arithmetic_splits(50, 20, seed=3, levels=(1, 2, 3, 4))
    b_train, b_test = make_arithmetic_splits(50, 20, seed=3, levels=(1, 2, 3, 4))
    assert [(p.id, p.question, p.answer, p.meta) for p in a_train + a_test] == [
        (p.id, p.question, p.answer, p.meta) for p in b_train + b_test
    ]
    c_train, _ = make_arithmetic_splits(50, 20, seed=4, levels=(1, 2, 3, 4))
    assert [p.question for p in c_train] != [p.question for p in a_train]


def test_held_out_split_is_disjoint_and_fixed():
    train, test = make_arithmetic_splits(2000, 200, seed=0, levels=(1, 2))
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.question for p in train}) == 2000 and len({p.question for p in test}) == 200
    _, test_again = make_arithmetic_splits(10, 200, seed=0, levels=(1, 2))  # independent of the train size
    assert [p.question for p in test_again] == [p.question for p in test]
    assert {p.meta["split"] for p in train} == {"train"} and {p.meta["split"] for p in test} == {"test"}


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_answers_are_the_integers_the_story_computes(level):
    problems = generate_problems(200, seed=1, levels=(level,))
    for p in problems:
        expression = p.meta["expression"]
        assert re.fullmatch(r"[\d ()+\-*]+", expression)
        value = eval(expression)  # only digits and + - * (checked above)
        assert p.answer == str(value) and value >= 0
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        assert max(numbers) <= LEVELS[level].max_number
        assert len(re.findall(r"[+\-*]", expression)) == LEVELS[level].steps == p.question.count(".") - 1
        assert p.meta["level"] == level


def test_level_one_is_a_single_digit_addition():
    for p in generate_problems(100, seed=2, levels=(1,)):
        a, b = (int(x) for x in re.fullmatch(r"(\d) \+ (\d)", p.meta["expression"]).groups())
        assert int(p.answer) == a + b and 1 <= a <= 9 and 1 <= b <= 9
        assert p.question.endswith("have now?") and len(p.question.split()) <= 20


def test_levels_are_round_robin_and_answers_grade():
    problems = generate_problems(8, seed=0, levels=(1, 3))
    assert [p.meta["level"] for p in problems] == [1, 3, 1, 3, 1, 3, 1, 3]
    for p in problems[:4]:
        assert grade_math(f"So the answer is \\boxed{{{p.answer}}}.", p.answer).correct
        assert not grade_math(f"\\boxed{{{int(p.answer) + 1}}}", p.answer).correct


def test_bad_level_and_exhausted_space():
    with pytest.raises(ValueError, match="level"):
        generate_problem(random.Random(0), 5)
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(10, seed=0, levels=(1,), exclude_texts=set(), max_attempts_per_problem=0)
