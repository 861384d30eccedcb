"""The unit every loader returns, and the account of what a load kept and dropped."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """id: unique within its source; answer: the gold answer as a string (a letter A-D for GPQA)."""

    id: str
    question: str
    answer: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class LoadReport:
    """Counts for one load, so that nothing is dropped without a number (logged as metrics / params)."""

    source: str
    path: str
    rows_read: int = 0
    kept: int = 0
    skipped_no_answer: int = 0
    skipped_bad_row: int = 0  # no question, not a record, or (GPQA) missing choices
    filtered_too_long: int = 0
    repaired: int = 0  # rows whose text was repaired (AIME25 control characters)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.source}: read {self.rows_read}, kept {self.kept}, skipped (no answer) {self.skipped_no_answer}, "
            f"skipped (bad row) {self.skipped_bad_row}, filtered (too long) {self.filtered_too_long}"
            + (f", repaired {self.repaired}" if self.repaired else "")
            + f" [{self.path}]"
        )
