"""A shortened `ngrpo demo` end to end on the real SmolLM2-135M-Instruct: table, plots and MLflow run."""

import json
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from ngrpo_ray.config import load_config
from ngrpo_ray.demo import run_demo

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]


def test_short_demo(tmp_path: Path):
    cfg = load_config("cpu_default", [
        f"trainer.output_dir={tmp_path / 'demo'}", "trainer.iterations=2", "trainer.validate_every=2",
        "trainer.prompts_per_iteration=2", "rollout.group_size=4", "trainer.mini_batches=1",
        "rollout.max_new_tokens=24", "eval.max_new_tokens=24", "eval.n=2", "data.limit=6"])
    lines: list[str] = []
    try:
        result = run_demo(cfg, log=lambda s: lines.append(str(s)))
    finally:
        ray.shutdown()
    out = Path(result["output_dir"])
    table = json.loads((out / "demo_table.json").read_text())
    assert (table["problems"], table["n"], table["after_step"]) == (6, 2, 2)
    for side in ("before", "after"):
        cell = table[side]["mean@n"]
        assert 0.0 <= cell["ci_low"] <= cell["value"] <= cell["ci_high"] <= 1.0
        assert table[side]["pass@2"]["value"] >= table[side]["pass@1"]["value"]
    d = table["mean_at_n_difference"]
    assert abs(d["value"] - (table["after"]["mean@n"]["value"] - table["before"]["mean@n"]["value"])) < 1e-9
    text = "\n".join(lines)
    assert "mean@n after - before" in text and "MLflow run" in text
    for name in ("reward.png", "validation.png", "pass_at_k.png", "mixing.png", "timing.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mean_at_n")] == [0, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2]
    demo_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "demo")}
    assert {"demo/pass_at_k.png", "demo/demo_table.txt", "demo/demo_table.json"} <= demo_artifacts
