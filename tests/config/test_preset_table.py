"""The README's preset table and workflows/presets/ agree: every preset file is named by a row (a row may name a
family with `*` or `{a,b}`), and every name a row gives is a preset that exists."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table_names() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("### Presets (`workflows/presets/`)", 1)[1].split("\n\n", 2)[1]
    names = []
    for row in table.splitlines()[2:]:
        first_cell = row.split("|")[1]
        names += re.findall(r"`([^`]+)`", first_cell)
    return names


def _expand(name: str) -> list[str]:
    """`ablation_metric_{l1,l2}_1p5b` -> both names; other names as they are."""
    braces = re.search(r"\{([^}]*)\}", name)
    if not braces:
        return [name]
    return [out for alt in braces.group(1).split(",")
            for out in _expand(name[: braces.start()] + alt + name[braces.end():])]


def test_every_preset_is_in_the_readme_table_and_every_row_is_a_preset():
    presets = sorted(p.stem for p in (ROOT / "workflows" / "presets").glob("*.yaml"))
    patterns = [x for name in _table_names() for x in _expand(name)]
    assert len(patterns) >= 10
    unnamed = [p for p in presets if not any(fnmatch.fnmatchcase(p, pat) for pat in patterns)]
    assert not unnamed, f"presets missing from README's preset table: {unnamed}"
    dangling = [pat for pat in patterns if not any(fnmatch.fnmatchcase(p, pat) for p in presets)]
    assert not dangling, f"README's preset table names presets that do not exist: {dangling}"
