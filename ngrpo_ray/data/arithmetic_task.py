"""The demo task: short arithmetic word problems with integer answers, deterministic from a seed.

Levels (the demo model, SmolLM2-135M-Instruct, is very weak at arithmetic, so level 1 is kept trivial):
  1: one addition of two single-digit numbers ("Tom has 3 apples. He gets 4 more apples. ...")
  2: two steps (add / subtract), numbers up to 20
  3: three steps (add / subtract / multiply by 2-4), numbers up to 50
  4: four steps, numbers up to 100
The held-out split is drawn from its own stream and is disjoint from train by problem text; it does not depend on
how many training problems are asked for.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from ngrpo_ray.data.problem import Problem

NAMES = (
    "Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Leo", "Emma",
    "Max", "Zoe", "Noah", "Ella", "Jack", "Ivy", "Omar", "Nora",
)
ITEMS = (  # (singular, plural)
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("book", "books"), ("sticker", "stickers"),
    ("cookie", "cookies"), ("coin", "coins"), ("shell", "shells"), ("card", "cards"), ("balloon", "balloons"),
    ("stamp", "stamps"), ("flower", "flowers"), ("toy car", "toy cars"), ("candy", "candies"), ("button", "buttons"),
    ("egg", "eggs"),
)
_ADD_PHRASES = ("gets {n} more {item}", "finds {n} more {item}", "buys {n} more {item}", "is given {n} more {item}")
_SUB_PHRASES = ("gives {n} {item} to a friend", "loses {n} {item}", "uses {n} {item}", "sells {n} {item}")
_MUL_PHRASES = {
    2: "doubles the number of {item}",
    3: "triples the number of {item}",
    4: "makes the number of {item} four times as large",
}


@dataclass(frozen=True)
class LevelSpec:
    steps: int
    max_number: int
    ops: tuple[str, ...]


LEVELS: dict[int, LevelSpec] = {
    1: LevelSpec(steps=1, max_number=9, ops=("add",)),
    2: LevelSpec(steps=2, max_number=20, ops=("add", "sub")),
    3: LevelSpec(steps=3, max_number=50, ops=("add", "sub", "mul")),
    4: LevelSpec(steps=4, max_number=100, ops=("add", "sub", "mul")),
}


def generate_problem(rng: random.Random, level: int) -> tuple[str, int, str]:
    """(question, answer, expression) for one problem; every intermediate count stays a non-negative integer."""
    if level not in LEVELS:
        raise ValueError(f"arithmetic level must be one of {sorted(LEVELS)}, got {level}")
    spec = LEVELS[level]
    name, (singular, item) = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, spec.max_number)
    expression = str(value)
    sentences = [f"{name} has {value} {singular if value == 1 else item}."]
    for step in range(spec.steps):
        op = rng.choice(spec.ops)
        if op == "sub" and value < 2:
            op = "add"
        if op == "mul" and value * 4 > 4 * spec.max_number:
            op = "sub"
        if op == "add":
            n = rng.randint(1, spec.max_number)
            value, expression, phrase = value + n, f"({expression} + {n})", rng.choice(_ADD_PHRASES)
        elif op == "sub":
            n = rng.randint(1, min(value - 1, spec.max_number))
            value, expression, phrase = value - n, f"({expression} - {n})", rng.choice(_SUB_PHRASES)
        else:
            n = rng.randint(2, 4)
            value, expression, phrase = value * n, f"({expression} * {n})", _MUL_PHRASES[n]
        lead = f"Then {name}" if step > 0 else name
        sentences.append(f"{lead} {phrase.format(n=n, item=singular if n == 1 and op != 'mul' else item)}.")
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), value, expression[1:-1] if expression.startswith("(") else expression


def generate_problems(
    n: int,
    seed: int,
    levels: Sequence[int] = (1,),
    split: str = "train",
    exclude_texts: set[str] | frozenset[str] = frozenset(),
    max_attempts_per_problem: int = 1000,
) -> list[Problem]:
    """n distinct problems, levels taken round-robin (so every level is equally represented), skipping any text in
    exclude_texts. Deterministic for (seed, split, levels)."""
    rng = random.Random(f"arithmetic:{split}:{seed}")
    seen: set[str] = set(exclude_texts)
    problems: list[Problem] = []
    for i in range(n):
        level = levels[i % len(levels)]
        for _ in range(max_attempts_per_problem):
            question, answer, expression = generate_problem(rng, level)
            if question not in seen:
                break
        else:
            raise ValueError(f"could not find {n} distinct level-{level} problems; ask for fewer")
        seen.add(question)
        meta = {"level": level, "expression": expression, "split": split, "seed": seed}
        problems.append(Problem(f"arithmetic/{split}/{i}", question, str(answer), "arithmetic", meta))
    return problems


def make_arithmetic_splits(
    n_train: int, n_test: int, seed: int = 0, levels: Sequence[int] = (1, 2)
) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out test). The test split is generated first from its own stream, so it is fixed for a seed and
    levels whatever n_train is; train problems never repeat a test text."""
    test = generate_problems(n_test, seed, levels, split="test")
    train = generate_problems(n_train, seed, levels, split="train", exclude_texts={p.question for p in test})
    return train, test
