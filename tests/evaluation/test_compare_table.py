"""The comparison workflow's plan (one run per method and seed, configs checked up front) and its table (seeds
pooled per method, paired differences), on hand-made per-sample grades."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ngrpo_ray.compare import comparison_table, format_comparison, plan_runs, run_comparison
from ngrpo_ray.compare_records import RunRecord, code_version, read_record, write_record
from ngrpo_ray.config import load_config


def test_plan_has_one_checked_run_per_method_and_seed(tmp_path):
    plan = plan_runs("cpu_default", ["trainer.iterations=3"], ["grpo", "n-grpo", "stht"], [0, 1], tmp_path)
    assert [(r.method, r.seed) for r in plan] == [("grpo", 0), ("grpo", 1), ("n-grpo", 0), ("n-grpo", 1),
                                                  ("stht", 0), ("stht", 1)]
    cfgs = [load_config("cpu_default", list(r.overrides)) for r in plan]
    assert [c.mixing.strategy for c in cfgs] == ["sample"] * 2 + ["neighbor_mix"] * 2 + ["gaussian_noise"] * 2
    assert cfgs[0].mixing.rho == 0.0 and cfgs[2].mixing.rho == cfgs[4].mixing.rho == 0.1  # same gate rate
    assert [c.trainer.validate_before for c in cfgs] == [True] + [False] * 5  # the base is validated once
    assert all(c.trainer.validate_every == 3 for c in cfgs)  # the final validation is the compared one
    assert [(c.trainer.seed, c.rollout.seed, c.mixing.seed) for c in cfgs[:2]] == [(0, 0, 0), (1, 1, 1)]
    assert len({c.trainer.output_dir for c in cfgs}) == 6
    assert len({c.tracking.tracking_uri for c in cfgs}) == 1  # one MLflow store for all runs
    with pytest.raises(ValueError, match="unknown method"):
        plan_runs("cpu_default", [], ["grpo", "ppo"], [0], tmp_path)


def _record(method: str, seed: int, grades, base=None, minutes=10.0) -> RunRecord:
    return RunRecord(method, seed, {}, np.asarray(grades, dtype=bool),
                     None if base is None else np.asarray(base, dtype=bool), minutes, "abc1234", "2 CPUs, 23 GiB")


def test_table_pools_seeds_and_pairs_problems():
    records = [_record("grpo", 0, [[1, 1], [0, 0], [1, 0], [0, 0]], base=[[1, 0], [0, 0], [1, 1], [0, 0]]),  # 3/8, 3/8
               _record("grpo", 1, [[1, 0], [1, 0], [1, 1], [0, 0]]),  # 4/8
               _record("n-grpo", 0, [[1, 1], [1, 1], [1, 1], [0, 0]]),  # 6/8
               _record("n-grpo", 1, [[1, 1], [0, 1], [1, 1], [1, 0]], minutes=12.5)]  # 6/8
    t = comparison_table(records)
    rows = t["rows"]
    assert (t["problems"], t["base_n"], t["n_per_run"], t["pass_k_max"]) == (4, 2, 2, 2)
    assert rows["base"]["mean@n"]["value"] == pytest.approx(3 / 8)
    assert rows["grpo"]["mean@n"]["value"] == pytest.approx(7 / 16)
    assert rows["n-grpo"]["mean@n"]["value"] == pytest.approx(12 / 16)
    assert rows["grpo"]["seeds"] == {0: pytest.approx(3 / 8), 1: pytest.approx(4 / 8)}
    # pooled n-grpo per problem: 4/4, 3/4, 4/4, 1/4; pass@2 unbiased: 1 - C(4-c, 2)/C(4, 2) -> 1, 1, 1, 0.5
    assert rows["n-grpo"]["pass@2"]["value"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert set(rows["n-grpo"]) >= {"pass@1", "pass@2"} and "pass@4" not in rows["n-grpo"]  # capped at base n
    d = rows["n-grpo"]["mean@n - grpo"]
    assert d["value"] == pytest.approx(12 / 16 - 7 / 16) and d["ci_low"] <= d["value"] <= d["ci_high"]
    assert rows["grpo"]["mean@n - base"]["value"] == pytest.approx(7 / 16 - 3 / 8)
    assert "mean@n - grpo" not in rows["grpo"]
    assert (t["runs"], t["run_minutes"], t["commits"]) == (4, 42.5, ["abc1234"])
    text = format_comparison(t)
    assert "| n-grpo | 75.0 [" in text and "| vs grpo (paired) |" in text
    assert "37.5, 50.0" in text  # grpo's per-seed Mean@n
    assert "4 runs, 42 minutes of training and validation in all; code abc1234; machine 2 CPUs, 23 GiB" in text
    with pytest.raises(ValueError, match="no base validation"):
        comparison_table(records[1:])


def _validation(folder: Path, step: int, grades) -> None:
    (folder / "validation").mkdir(parents=True, exist_ok=True)
    np.save(folder / "validation" / f"step_{step}.npy", np.asarray(grades, dtype=bool))


def test_a_record_round_trips_and_is_reused_only_for_the_same_config(tmp_path):
    plan = plan_runs("cpu_default", ["trainer.iterations=2"], ["grpo", "n-grpo"], [0], tmp_path / "runs")
    cfgs = [load_config("cpu_default", list(r.overrides)) for r in plan]
    _validation(plan[0].output_dir, 0, [[1, 0, 0], [0, 0, 1]])
    _validation(plan[0].output_dir, 2, [[1, 1, 0], [0, 1, 1]])
    _validation(plan[1].output_dir, 2, [[0, 0, 0], [1, 1, 1]])
    records = tmp_path / "records"
    write_record(records, "grpo", 0, cfgs[0], plan[0].output_dir, 11.25, "abc1234+changes")
    write_record(records, "n-grpo", 0, cfgs[1], plan[1].output_dir, None, None)
    stored = json.loads((records / "grpo_seed0.json").read_text())
    assert stored["grades"] == ["110", "011"] and stored["base_grades"] == ["100", "001"] and stored["minutes"] == 11.25
    assert stored["commit"] == "abc1234+changes"
    back, why = read_record(records, "grpo", 0, cfgs[0], needs_base=True)
    assert why == "" and back.grades.tolist() == [[True, True, False], [False, True, True]] and back.minutes == 11.25
    assert back.base_grades.sum() == 2 and back.config["mixing.strategy"] == "sample"
    assert "trainer.output_dir" not in stored["config"]  # a run's own paths are not part of what it measured
    # the n-grpo run validated no base: not reusable as the first run, reusable otherwise
    assert read_record(records, "n-grpo", 0, cfgs[1], needs_base=True) == \
        (None, "recorded without the base validation this run must now provide")
    assert read_record(records, "n-grpo", 0, cfgs[1], needs_base=False)[0].grades.sum() == 3
    moved = load_config("cpu_default", [*plan[0].overrides, f"trainer.output_dir={tmp_path / 'elsewhere'}"])
    assert read_record(records, "grpo", 0, moved, needs_base=True)[0] is not None
    faster = load_config("cpu_default", [*plan[0].overrides, "trainer.lr=2e-6", "rollout.temperature=0.9"])
    assert read_record(records, "grpo", 0, faster, needs_base=True) == \
        (None, "recorded with other values of rollout.temperature, trainer.lr")
    # a key the record predates (an option added later, default unchanged) does not void it
    del stored["config"]["trainer.lr"]
    (records / "grpo_seed0.json").write_text(json.dumps(stored))
    assert read_record(records, "grpo", 0, cfgs[0], needs_base=True)[0] is not None
    assert read_record(records, "grpo", 1, cfgs[0], needs_base=False) == (None, "")  # no record for that seed


def test_the_comparison_refuses_stale_records_before_training(tmp_path):
    plan = plan_runs("cpu_default", ["trainer.iterations=2"], ["grpo"], [0], tmp_path / "runs")
    _validation(plan[0].output_dir, 0, [[1, 0]])
    _validation(plan[0].output_dir, 2, [[1, 1]])
    write_record(tmp_path / "records", "grpo", 0, load_config("cpu_default", list(plan[0].overrides)),
                 plan[0].output_dir, 1.0, "abc1234")
    with pytest.raises(ValueError, match=r"measured something else \(grpo seed 0: recorded with other values of "
                                         r"trainer.lr\)"):
        run_comparison("cpu_default", ["trainer.iterations=2", "trainer.lr=3e-6"], ["grpo"], [0],
                       tmp_path / "runs", tmp_path / "records")


def test_a_record_names_the_commit_and_whether_the_code_differed_from_it(tmp_path):
    def git(*args) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    assert code_version(tmp_path) is None  # not a checkout
    (tmp_path / "ngrpo_ray").mkdir()
    (tmp_path / "ngrpo_ray" / "loss.py").write_text("A = 1\n")
    (tmp_path / "README.md").write_text("table\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short", "HEAD")
    assert code_version(tmp_path) == head
    (tmp_path / "README.md").write_text("a new table\n")  # docs and records do not change what a run measures
    assert code_version(tmp_path) == head
    (tmp_path / "ngrpo_ray" / "loss.py").write_text("A = 2\n")
    assert code_version(tmp_path) == head + "+changes"
    git("checkout", "-q", "--", "ngrpo_ray")
    (tmp_path / "ngrpo_ray" / "new_loss.py").write_text("B = 1\n")  # new code not yet committed counts too
    assert code_version(tmp_path) == head + "+changes"


def test_the_readme_table_is_the_committed_records_table():
    """The README's comparison rows are rebuilt from results/compare_cpu (grpo seed 0 holds the base grades), and
    every committed record still measures today's compare_cpu config."""
    root = Path(__file__).resolve().parents[2]
    plan = plan_runs("compare_cpu", [], ["grpo", "n-grpo", "stht"], [0, 1, 2, 3], root / "runs" / "compare")
    found = []
    for run in plan:
        record, why = read_record(root / "results" / "compare_cpu", run.method, run.seed,
                                  load_config("compare_cpu", list(run.overrides)), needs_base=run is plan[0])
        assert why == "", f"{run.method} seed {run.seed}: {why}"
        if record is not None:
            found.append(record)
    assert found and found[0].method == "grpo" and found[0].seed == 0
    readme = (root / "README.md").read_text()
    rows = [line for line in format_comparison(comparison_table(found)).splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and all(row in readme for row in rows), rows
