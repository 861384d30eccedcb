import csv
from collections import Counter

import pytest

from ngrpo_ray.data import load_benchmark, load_gpqa_diamond, shuffle_choices

HEADER = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
GOOD = [
    ["rec1", "Which is a noble gas?", "Argon", "Oxygen", "Nitrogen", "Hydrogen"],
    ["rec2", "What is 6 x 7?\nPick one.", "42", "41", "43", "48"],  # multi-line question inside quotes
    ["rec3", "Largest planet?", "Jupiter", "Mars", "Venus", "Earth"],
]
BAD = [
    ["rec4", "No correct answer given", "", "a", "b", "c"],
    ["rec5", "Missing a distractor", "x", "y", "", "z"],
    ["rec6", "", "x", "y", "w", "z"],
]


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def test_synthetic_gpqa_loads_with_letters_pointing_at_the_correct_text(tmp_path):
    path = write_csv(tmp_path / "gpqa.csv", GOOD + BAD)
    problems, report = load_gpqa_diamond(path)
    assert (report.rows_read, report.kept, report.skipped_no_answer, report.skipped_bad_row) == (6, 3, 1, 2)
    for p, row in zip(problems, GOOD):
        choices = p.meta["choices"]
        assert sorted(choices) == sorted(row[2:])
        assert choices["ABCD".index(p.answer)] == row[2] == p.meta["correct_text"]
        assert f"{p.answer}) {row[2]}" in p.question.splitlines()
        assert p.question.startswith(row[1].strip())
    assert problems[1].question.startswith("What is 6 x 7?\nPick one.\n\nA) ")
    assert [p.id for p in problems] == ["gpqa_diamond/rec1", "gpqa_diamond/rec2", "gpqa_diamond/rec3"]


def test_shuffle_is_deterministic_per_question_and_seeded(tmp_path):
    first, _ = load_gpqa_diamond(write_csv(tmp_path / "a.csv", GOOD))
    again, _ = load_gpqa_diamond(write_csv(tmp_path / "b.csv", list(reversed(GOOD))))  # row order does not matter
    by_id = {p.id: (p.answer, p.meta["choices"]) for p in again}
    assert all(by_id[p.id] == (p.answer, p.meta["choices"]) for p in first)
    other_seed, _ = load_gpqa_diamond(tmp_path / "a.csv", seed=1)
    assert [p.meta["choices"] for p in other_seed] != [p.meta["choices"] for p in first]


def test_correct_letters_are_spread_over_a_to_d():
    letters = Counter(shuffle_choices("right", ["w1", "w2", "w3"], key=str(i), seed=0)[1] for i in range(400))
    assert set(letters) == set("ABCD") and all(60 <= n <= 140 for n in letters.values()), letters


def test_gpqa_needs_a_user_path_and_the_official_columns(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_benchmark("gpqa_diamond")
    bad = tmp_path / "bad.csv"
    bad.write_text("Question,Answer\nq,a\n")
    with pytest.raises(ValueError, match="Correct Answer"):
        load_gpqa_diamond(bad)
    problems, _ = load_benchmark("gpqa_diamond", write_csv(tmp_path / "g.csv", GOOD))
    assert len(problems) == 3
