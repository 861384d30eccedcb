"""Loaders for the math sets: any local json / jsonl / parquet with a field mapping, and the named benchmarks built on
it. Every loader returns (problems, LoadReport); rows without an answer or a question are skipped and counted."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ngrpo_ray.data.problem import LoadReport, Problem
from ngrpo_ray.data.readers import read_records
from ngrpo_ray.data.repair import has_control_characters, repair_decoded_escapes

DEEPSCALER_HUB_NAME = "agentica-org/DeepScaleR-Preview-Dataset"
_MISSING = object()


def get_field(record: Any, dotted: str) -> Any:
    """record["a"]["b"][0] for "a.b.0"; a missing step gives _MISSING instead of raising."""
    value = record
    for part in dotted.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _as_text(value: Any) -> str | None:
    if value is _MISSING or value is None:
        return None
    text = str(value).strip()
    return text or None


def problems_from_records(
    records: Iterable[Any],
    *,
    source: str,
    path: str,
    question_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    repair_escapes: bool = False,
) -> tuple[list[Problem], LoadReport]:
    report = LoadReport(source=source, path=path)
    problems: list[Problem] = []
    top_level = {question_field.split(".")[0], answer_field.split(".")[0]}
    for index, record in enumerate(records):
        report.rows_read += 1
        if not isinstance(record, dict):
            report.skipped_bad_row += 1
            continue
        question = _as_text(get_field(record, question_field))
        if question is None:
            report.skipped_bad_row += 1
            continue
        answer = _as_text(get_field(record, answer_field))
        if answer is None:
            report.skipped_no_answer += 1
            continue
        if repair_escapes and (has_control_characters(question) or has_control_characters(answer)):
            question, answer = repair_decoded_escapes(question), repair_decoded_escapes(answer)
            report.repaired += 1
        row_id = _as_text(get_field(record, id_field)) if id_field else None
        meta = {k: v for k, v in record.items() if k not in top_level}
        meta["row"] = index
        problem_id = f"{source}/{row_id or index}"
        problems.append(Problem(id=problem_id, question=question, answer=answer, source=source, meta=meta))
    report.kept = len(problems)
    return problems, report


def load_local(
    path: str | Path,
    question_field: str = "problem",
    answer_field: str = "answer",
    source: str | None = None,
    id_field: str | None = None,
    repair_escapes: bool = False,
) -> tuple[list[Problem], LoadReport]:
    """Any local .json / .jsonl / .parquet; fields may be dotted paths into nested records ("prompt.0.value")."""
    path = Path(path)
    return problems_from_records(
        read_records(path),
        source=source or path.stem,
        path=str(path),
        question_field=question_field,
        answer_field=answer_field,
        id_field=id_field,
        repair_escapes=repair_escapes,
    )


def load_hub(
    name: str, split: str, question_field: str, answer_field: str, source: str
) -> tuple[list[Problem], LoadReport]:
    """`datasets.load_dataset(name)`: needs a reachable hub (or its local cache). Never used by the tests."""
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do instead
        raise RuntimeError(
            f"could not load {name!r} (split {split!r}) from the hub: {exc}. Without a hub, pass a local path."
        ) from exc
    return problems_from_records(
        rows, source=source, path=f"hub:{name}:{split}", question_field=question_field, answer_field=answer_field
    )


def load_math500(path: str | Path) -> tuple[list[Problem], LoadReport]:
    return load_local(path, "problem", "answer", source="math500", id_field="unique_id")


def load_aime24(path: str | Path) -> tuple[list[Problem], LoadReport]:
    return load_local(path, "problem", "answer", source="aime24")


def load_aime25(path: str | Path) -> tuple[list[Problem], LoadReport]:
    # Three rows of the shared copy hold control characters where "\f", "\t" escapes were decoded: repaired here.
    return load_local(path, "prompt.0.value", "final_answer", source="aime25", repair_escapes=True)


def load_amc23(path: str | Path) -> tuple[list[Problem], LoadReport]:
    return load_local(path, "prompt.0.value", "final_answer", source="amc23", repair_escapes=True)


def load_math_train(path: str | Path) -> tuple[list[Problem], LoadReport]:
    return load_local(path, "problem", "answer", source="math_train")


def load_aime_train(path: str | Path) -> tuple[list[Problem], LoadReport]:
    return load_local(path, "problem", "answer", source="aime_train")


def load_deepscaler(
    path: str | Path | None = None, hub_name: str = DEEPSCALER_HUB_NAME
) -> tuple[list[Problem], LoadReport]:
    """DeepScaleR-Preview (40,315 rows, 6 without an answer): a local json/jsonl/parquet, else the hub."""
    if path is not None:
        return load_local(path, "problem", "answer", source="deepscaler")
    return load_hub(hub_name, "train", "problem", "answer", source="deepscaler")
