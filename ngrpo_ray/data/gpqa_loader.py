"""GPQA-Diamond from a user-supplied copy of the official CSV (its authors ask that examples never be published
in plain text, so nothing ships with the project). Choices are shuffled to A-D with a fixed seed per question."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from ngrpo_ray.data.problem import LoadReport, Problem

GPQA_QUESTION_COLUMN = "Question"
GPQA_CORRECT_COLUMN = "Correct Answer"
GPQA_INCORRECT_COLUMNS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = ("A", "B", "C", "D")


def shuffle_choices(correct: str, incorrect: list[str], key: str, seed: int) -> tuple[list[str], str]:
    """The four choices in a fixed order for (seed, key) and the letter of the correct one."""
    choices = [correct, *incorrect]
    order = list(range(4))
    random.Random(f"gpqa:{seed}:{key}").shuffle(order)  # str seeds are stable across runs and processes
    shuffled = [choices[i] for i in order]
    return shuffled, LETTERS[order.index(0)]


def format_gpqa_question(question: str, choices: list[str]) -> str:
    lines = [question.strip(), ""]
    lines += [f"{letter}) {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines)


def load_gpqa_diamond(path: str | Path, seed: int = 0) -> tuple[list[Problem], LoadReport]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GPQA-Diamond CSV not found: {path} (download gpqa_diamond.csv from the GPQA release)")
    report = LoadReport(source="gpqa_diamond", path=str(path))
    problems: list[Problem] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or [])
        needed = {GPQA_QUESTION_COLUMN, GPQA_CORRECT_COLUMN, *GPQA_INCORRECT_COLUMNS}
        if not needed <= columns:
            raise ValueError(f"{path}: not the official GPQA CSV, missing columns {sorted(needed - columns)}")
        for index, row in enumerate(reader):
            report.rows_read += 1
            question = (row.get(GPQA_QUESTION_COLUMN) or "").strip()
            correct = (row.get(GPQA_CORRECT_COLUMN) or "").strip()
            incorrect = [(row.get(c) or "").strip() for c in GPQA_INCORRECT_COLUMNS]
            if not question:
                report.skipped_bad_row += 1
                continue
            if not correct:
                report.skipped_no_answer += 1
                continue
            if not all(incorrect):
                report.skipped_bad_row += 1
                continue
            key = (row.get("Record ID") or "").strip() or str(index)
            choices, letter = shuffle_choices(correct, incorrect, key, seed)
            problems.append(
                Problem(
                    id=f"gpqa_diamond/{key}",
                    question=format_gpqa_question(question, choices),
                    answer=letter,
                    source="gpqa_diamond",
                    meta={"choices": choices, "correct_text": correct, "raw_question": question, "row": index},
                )
            )
    report.kept = len(problems)
    return problems, report
