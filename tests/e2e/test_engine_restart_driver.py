"""Engine fault tolerance in a training run: a rollout engine killed during iteration 2 (real `ray.kill`, Ray
restarts it) is re-synced to the driver's policy version, its chunk is re-issued, the run finishes, and MLflow
records the restart (metric, tag and restarts.json)."""

import json
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from ngrpo_ray.config import load_config
from ngrpo_ray.distributed.driver import train
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]


def test_engine_killed_mid_rollout_is_resynced_and_logged(tmp_path, monkeypatch):
    model = write_tiny_chat_model(tmp_path / "tiny_chat")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    cfg = load_config("cpu_default", [
        f"model.path={model}", f"data.train={data}", "data.validation=null", "data.limit=4",
        "rollout.num_engines=2", "rollout.engine_cpus=0.5", "rollout.kv_cache_space_gib=0.25",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.prompts_per_iteration=2",
        "trainer.mini_batches=1", "trainer.micro_batch_size=2", "trainer.iterations=2", "trainer.validate_every=0",
        "trainer.validate_before=false", f"trainer.output_dir={out}", "cluster.num_cpus=4", "tracking.plots=false",
        "cluster.engine_max_restarts=1"])
    # Iteration 2 rolls out at policy version 1: the restarted engine loads version 0, so only a resync lets it serve.
    monkeypatch.setenv("NGRPO_TEST_KILL_ENGINE", "2:1")
    try:
        summary = train(cfg)
    finally:
        ray.shutdown()

    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("policy_version") == [(1, 1.0), (2, 2.0)]  # the sync after the restart went through the new group
    assert history("fault/engine_restarts") == [(1, 0.0), (2, 1.0)]
    assert run.data.tags["fault.engine_restarts"] == "1"
    assert "restarts.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    restarts = json.loads(Path(client.download_artifacts(run.info.run_id, "restarts.json", str(tmp_path))).read_text())
    assert len(restarts) == 1
    r = restarts[0]
    assert (r["engine"], r["iteration"], r["policy_version"]) == (1, 2, 1)
    assert r["engine_policy_version"] == r["policy_version"]  # the restarted engine serves the driver's version
    assert r["recover_s"] > 0
