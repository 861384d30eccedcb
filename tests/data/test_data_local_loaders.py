import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ngrpo_ray.data import load_deepscaler, load_local, repair_decoded_escapes, has_control_characters

ROWS = [
    {"q": "1+1?", "a": "2", "extra": 7},
    {"q": "2+2?", "a": ""},  # empty answer
    {"q": "3+3?"},  # no answer field
    {"a": "5"},  # no question
    {"q": "4+4?", "a": 8},  # numeric answer becomes "8"
    {"q": "   ", "a": "1"},  # blank question
    {"q": "5+5?", "a": None},
]


def test_jsonl_with_field_mapping_counts_bad_rows(tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [json.dumps(r) for r in ROWS] + ["not json at all", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    problems, report = load_local(path, question_field="q", answer_field="a")
    assert [(p.question, p.answer) for p in problems] == [("1+1?", "2"), ("4+4?", "8")]
    assert [p.id for p in problems] == ["set/0", "set/4"]
    assert problems[0].meta == {"extra": 7, "row": 0}
    assert (report.rows_read, report.kept, report.skipped_no_answer, report.skipped_bad_row) == (9, 2, 3, 4)


def test_parquet_and_nested_fields(tmp_path):
    path = tmp_path / "set.parquet"
    table = pa.Table.from_pylist(
        [
            {"prompt": [{"from": "user", "value": "Find x."}], "final_answer": "3", "uid": "p1"},
            {"prompt": [{"from": "user", "value": "Find y."}], "final_answer": None, "uid": "p2"},
            {"prompt": [], "final_answer": "4", "uid": "p3"},
        ]
    )
    pq.write_table(table, path)
    problems, report = load_local(path, "prompt.0.value", "final_answer", source="mine", id_field="uid")
    assert [(p.id, p.question, p.answer, p.source) for p in problems] == [("mine/p1", "Find x.", "3", "mine")]
    assert (report.rows_read, report.kept, report.skipped_no_answer, report.skipped_bad_row) == (3, 1, 1, 1)


def test_json_list_or_data_key_and_deepscaler_by_path(tmp_path):
    rows = [{"problem": "p1", "answer": "1", "solution": "s"}, {"problem": "p2", "answer": ""}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    for name in ("a.json", "b.json"):
        problems, report = load_deepscaler(tmp_path / name)
        assert [p.question for p in problems] == ["p1"] and report.skipped_no_answer == 1
        assert problems[0].source == "deepscaler" and problems[0].meta["solution"] == "s"


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_local(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_local(tmp_path / "nope.jsonl")


def test_repair_of_decoded_escapes():
    broken = "A \x0crac{1}{2} and $\triangle ABC$ with a real\ttab 1 and \x08eta"
    fixed = repair_decoded_escapes(broken)
    assert fixed == "A \\frac{1}{2} and $\\triangle ABC$ with a real\\ttab 1 and \\beta"
    assert has_control_characters(broken) and not has_control_characters(fixed)
    assert repair_decoded_escapes("line one\nline two\t 3") == "line one\nline two\t 3"  # real whitespace kept
