"""The shared offline copies (../shared/data). Skipped, with the reason, where that folder is absent."""
import json
from pathlib import Path

import pytest

import ngrpo_ray
from ngrpo_ray.data import DATA_DIR_ENV, data_root, has_control_characters, load_benchmark

SHARED = data_root()
needs_shared = pytest.mark.skipif(
    not (SHARED / "math500" / "test.jsonl").exists(), reason=f"shared data folder not found at {SHARED}"
)


@needs_shared
@pytest.mark.parametrize("name, rows", [("math500", 500), ("aime24", 30), ("aime25", 30), ("amc23", 40)])
def test_benchmark_row_counts(name, rows):
    problems, report = load_benchmark(name)
    assert len(problems) == rows == report.kept == report.rows_read
    assert report.skipped_no_answer == report.skipped_bad_row == 0
    assert len({p.id for p in problems}) == rows
    assert all(p.question and p.answer for p in problems)


@needs_shared
def test_aime25_rows_are_repaired():
    problems, report = load_benchmark("aime25")
    assert report.repaired == 3
    assert not any(has_control_characters(p.question) for p in problems)
    assert "\\frac{\\log_k" in problems[18].question and "\x0c" not in problems[18].question
    assert "circumcircle of $\\triangle DEF$" in problems[19].question
    assert "$\\frac{m}{n}$" in problems[27].question
    raw = json.loads((SHARED / "aime25" / "test.json").read_text())
    untouched = [i for i in range(30) if i not in (18, 19, 27)]
    assert all(problems[i].question == raw[i]["prompt"][0]["value"].strip() for i in untouched)
    assert [p.answer for p in problems[:3]] == ["70", "588", "16"]


@needs_shared
def test_answers_and_training_sets():
    aime24, _ = load_benchmark("aime24")
    assert aime24[1].answer == "025"  # kept as written; the grader reads it as 25
    assert aime24[7].answer == "197"  # the "Eight circles of radius 34" problem (a bad copy elsewhere says 480)
    math500, _ = load_benchmark("math500")
    assert math500[0].id == "math500/test/precalculus/807.json" and math500[0].meta["level"] == 2
    math_train, report = load_benchmark("math_train")
    assert (report.rows_read, report.kept, report.skipped_no_answer) == (7474, 7470, 4)
    aime_train, report = load_benchmark("aime_train")
    assert report.kept == 975


def test_default_root_is_shared_data_next_to_the_repo(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    repo_root = Path(ngrpo_ray.__file__).resolve().parent.parent
    assert data_root() == repo_root.parent / "shared" / "data"


def test_env_override_and_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "test.jsonl").write_text(
        json.dumps({"problem": "p", "answer": "1", "unique_id": "u1"}) + "\n" + json.dumps({"problem": "q"}) + "\n"
    )
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    problems, report = load_benchmark("math500")
    assert [p.id for p in problems] == ["math500/u1"] and report.skipped_no_answer == 1
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "aime24" / "test.json")):
        load_benchmark("aime24")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_benchmark("aime24", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_benchmark("gsm9k")
    with pytest.raises(ValueError, match="local path"):
        load_benchmark("deepscaler")
