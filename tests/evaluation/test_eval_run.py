"""`ngrpo eval`: the reported table agrees with an independent recomputation from the saved per-sample grades.

Fast tests use synthetic grades; the engine test runs the real command (vLLM-CPU engine, grading pool, MLflow) on
SmolLM2-135M-Instruct with a MATH500 slice."""

import json
import math
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ngrpo_ray.evaluation.report import summarize, write_reports
from ngrpo_ray.evaluation.run import (_checked_correct_matrix, eval_metrics, pass_at_k_plot,
                                      recompute_from_grades)


def _write_grades(path, benches: dict[str, np.ndarray]) -> None:
    with path.open("w") as f:
        for bench, correct in benches.items():
            for p in range(correct.shape[0]):
                for s in reversed(range(correct.shape[1])):  # order must not matter
                    f.write(json.dumps({"benchmark": bench, "problem_id": f"{bench}/{p}", "sample": s,
                                        "correct": bool(correct[p, s]), "status": "ok"}) + "\n")


def _assert_agree(table: dict, recomputed: dict) -> None:
    for bench, expected in recomputed.items():
        got = table[bench]
        assert (got["problems"], got["n"]) == (expected["problems"], expected["n"])
        assert {k for k in got if k.startswith("pass@")} == {k for k in expected if k.startswith("pass@")}
        for key in ("mean@n", *[k for k in expected if k.startswith("pass@")]):
            # numpy's product form vs exact rationals: equal up to the last bits of a double
            assert math.isclose(got[key]["value"], expected[key], rel_tol=0, abs_tol=1e-12), (bench, key)


def test_recompute_hand_values(tmp_path):
    # n=4; problem correct counts 0, 1, 2, 4 -> pass@1 = mean = (0 + 1/4 + 2/4 + 1) / 4 = 7/16
    # pass@2: 1 - C(4-c,2)/6 -> 0, 1/2, 5/6, 1 -> mean 7/12; pass@4: 0, 1, 1, 1 -> 3/4
    correct = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=bool)
    _write_grades(tmp_path / "g.jsonl", {"toy": correct})
    r = recompute_from_grades(tmp_path / "g.jsonl")["toy"]
    assert r == {"problems": 4, "n": 4, "mean@n": 7 / 16, "pass@1": 7 / 16, "pass@2": 7 / 12, "pass@4": 3 / 4}


def test_report_json_agrees_with_recomputation_and_metrics_are_named(tmp_path):
    rng = np.random.default_rng(1)
    benches = {name: rng.random((30, 8)) < rng.random((30, 1)) for name in ("a", "b")}
    _write_grades(tmp_path / "g.jsonl", benches)
    paths = write_reports({k: summarize(v, n_resamples=500) for k, v in benches.items()}, tmp_path, "eval")
    table = json.loads(paths["json"].read_text())
    recomputed = recompute_from_grades(tmp_path / "g.jsonl")
    _assert_agree(table, recomputed)
    assert set(table) == {"a", "b", "average"}
    assert math.isclose(table["average"]["pass@8"]["value"], (recomputed["a"]["pass@8"] + recomputed["b"]["pass@8"]) / 2)
    metrics = eval_metrics(table, {"a": {"dropped_too_long": 2, "truncated_fraction": 0.5, "response_length_mean": 9.0,
                                         "seconds": 1.0, "grading": {"timeouts": 1}}})
    assert metrics["eval/a/mean@n"] == table["a"]["mean@n"]["value"]
    assert metrics["eval/b/pass@4_ci_low"] == table["b"]["pass@4"]["ci_low"]
    assert metrics["eval/a/dropped_too_long"] == 2.0 and metrics["eval/a/grading_timeouts"] == 1.0
    png = pass_at_k_plot(table, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recompute_rejects_duplicates_and_ragged_groups(tmp_path):
    path = tmp_path / "g.jsonl"
    row = {"benchmark": "x", "problem_id": "p", "sample": 0, "correct": True, "status": "ok"}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        recompute_from_grades(path)
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "problem_id": "q"}) + "\n"
                    + json.dumps({**row, "problem_id": "q", "sample": 1}) + "\n")
    with pytest.raises(ValueError, match="different sample counts"):
        recompute_from_grades(path)


def test_missing_sample_is_an_error_not_a_wrong_answer():
    scored = SimpleNamespace(group=np.array([0, 0, 1]), sample=np.array([0, 1, 0]),
                             rewards=np.array([1.0, 0.0, 1.0]))
    with pytest.raises(RuntimeError, match="expected 2 x 2"):
        _checked_correct_matrix(scored, 2, 2, "bench")


# Issue 6 asks for a 50-problem slice (16 problems x 4 samples took 70 s in CI; 50 took 519 s on a machine at load ~30).
ENGINE_PROBLEMS = int(os.environ.get("NGRPO_EVAL_TEST_PROBLEMS", "50"))


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.ray
def test_ngrpo_eval_on_smollm2_math500(tmp_path, capsys):
    from ngrpo_ray.cli import main

    out = tmp_path / "run"
    t0 = time.perf_counter()
    rc = main(["eval", "--config", "cpu_default", "model.path=smollm2-135m-instruct", "eval.benchmarks=[math500]",
               f"data.limit={ENGINE_PROBLEMS}", "data.prompt_template=r1", "data.max_prompt_tokens=512",
               "eval.n=4", "eval.max_new_tokens=40", "rollout.max_new_tokens=40", "rollout.num_engines=1",
               "cluster.num_cpus=4", f"trainer.output_dir={out}", "tracking.experiment=eval-test"])
    seconds = time.perf_counter() - t0
    assert rc == 0
    printed = capsys.readouterr().out
    start = printed.rindex("\n{\n") + 1  # the command prints its result as an indented JSON object last
    result, _ = json.JSONDecoder().raw_decode(printed[start:])
    with capsys.disabled():
        for line in printed.splitlines():
            if line.startswith(("eval:", "math500:")):
                print(line)
        print(f"ngrpo eval: {ENGINE_PROBLEMS} problems x 4 samples in {seconds:.0f}s")

    grades = [json.loads(line) for line in (out / "eval" / "grades.jsonl").read_text().splitlines()]
    assert len(grades) == ENGINE_PROBLEMS * 4
    with capsys.disabled():
        statuses = {st: sum(g["status"] == st for g in grades) for st in {g["status"] for g in grades}}
        print(f"correct {sum(g['correct'] for g in grades)}/{len(grades)}; statuses {statuses}")
    assert {g["benchmark"] for g in grades} == {"math500"}
    assert all(g["status"] for g in grades)
    table = json.loads((out / "eval" / "eval.json").read_text())
    assert table == result["summaries"]
    recomputed = recompute_from_grades(out / "eval" / "grades.jsonl")
    assert recomputed["math500"]["problems"] == ENGINE_PROBLEMS
    _assert_agree(table, recomputed)
    assert set(table["math500"]) >= {"mean@n", "pass@1", "pass@2", "pass@4", "bootstrap_best@4"}
    assert "pass@8" not in table["math500"]

    client = MlflowClient(result["mlflow"]["tracking_uri"])
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "eval-test"
    assert run.data.metrics["eval/math500/mean_at_n"] == table["math500"]["mean@n"]["value"]
    for k in (1, 2, 4):
        assert run.data.metrics[f"eval/math500/pass_at_{k}"] == table["math500"][f"pass@{k}"]["value"]
    assert run.data.params["eval.n"] == "4"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/eval.csv", "eval/eval.md", "eval/grades.jsonl", "eval/pass_at_k.png"} <= artifacts


def test_compare_runs_aligns_problems_by_id(tmp_path):
    from ngrpo_ray.evaluation.compare import compare_runs

    a = np.array([[1, 0], [0, 0], [1, 1]], dtype=bool)  # problems 0, 1, 2
    b = np.array([[0, 1], [0, 0], [0, 0]], dtype=bool)
    _write_grades(tmp_path / "a.jsonl", {"m": a})
    # run b lists the problems in reverse order and an extra problem 3: alignment must go by id
    with (tmp_path / "b.jsonl").open("w") as f:
        for p in (3, 2, 1, 0):
            for s in range(2):
                correct = bool(b[p, s]) if p < 3 else True
                f.write(json.dumps({"benchmark": "m", "problem_id": f"m/{p}", "sample": s, "correct": correct}) + "\n")
    r = compare_runs(tmp_path / "a.jsonl", tmp_path / "b.jsonl")["m"]
    assert r["problems"] == 3
    assert r["solved_only_a"] == ["m/2"] and r["solved_only_b"] == [] and r["solved_both"] == 1
    assert r["solved_neither"] == 1
    assert math.isclose(r["mean_diff"]["value"], (0.5 + 0 + 1) / 3 - (0.5 + 0 + 0) / 3)
