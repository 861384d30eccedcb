"""Fault tolerance in one training run on a real local Ray cluster (2 vLLM engines, a DeepSpeed trainer):

- iteration 1: rollout engine 1 is killed as the weight sync begins: the sync fails, the driver closes the group (the
  other engine stops waiting in it), waits for Ray's restart, rebuilds the group and sends the update again;
- iteration 2: rollout engine 1 is killed mid-rollout (`ray.kill`, Ray restarts it): it is re-synced to the driver's
  policy version and its chunk re-issued;
- iteration 3: engine 0 is killed after the rollout, while the trainer updates: the driver finds it before the weight
  sync (new incarnation id) and rebuilds the sync group;
- iteration 4: the trainer worker process is SIGKILLed mid-update: Ray Train restarts the worker group, the driver
  restores the iteration-3 checkpoint and runs iteration 4 again with the same prompts.
The run finishes and MLflow records every restart (metrics, tags, restarts.json)."""

import json

import pytest

from ngrpo_ray.config import load_config
from tests.support.faults import inject_faults
from tests.support.runs import train_and_read
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]


def test_engines_and_trainer_killed_the_run_recovers_and_logs(tmp_path, monkeypatch):
    model = write_tiny_chat_model(tmp_path / "tiny_chat")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    cfg = load_config("cpu_default", [
        f"model.path={model}", f"data.train={data}", "data.validation=null", "data.limit=4",
        "rollout.num_engines=2", "rollout.engine_cpus=0.5", "rollout.kv_cache_space_gib=0.25",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.prompts_per_iteration=2",
        "trainer.mini_batches=1", "trainer.micro_batch_size=2", "trainer.iterations=4", "trainer.validate_every=0",
        "trainer.validate_before=false", "trainer.checkpoint_every=1", f"trainer.output_dir={out}",
        "cluster.num_cpus=4", "tracking.plots=false", "cluster.engine_max_restarts=2", "cluster.trainer_max_restarts=1"])
    # Iteration 2 rolls out at policy version 1: the restarted engine loads version 0, so only a resync lets it serve.
    inject_faults(monkeypatch, engine_kills=[(2, 1, "rollout"), (3, 0, "train")], trainer_kills=[(4, 0)],
                  sync_kills=[(1, 1)])
    rec = train_and_read(cfg)

    assert rec.run.info.status == "FINISHED"
    assert rec.history("policy_version") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]  # step 4 once: logged after
    assert rec.history("fault/engine_restarts") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]
    assert rec.history("fault/trainer_restarts") == [(1, 0.0), (2, 0.0), (3, 0.0), (4, 1.0)]
    assert (rec.run.data.tags["fault.engine_restarts"], rec.run.data.tags["fault.trainer_restarts"]) == ("3", "1")
    # every engine serves the weights the trainer holds: the engine that was receiving when the other one died
    # (and may hold part of the update) got all of it again
    gaps = [v for _, v in rec.history("mismatch/abs_diff_max")]
    assert len(gaps) == 4 and all(0.0 <= g < 1e-4 for g in gaps), gaps
    assert "restarts.json" in rec.artifacts()
    engine_sync, engine_mid, engine_between, trainer = rec.json_artifact("restarts.json", tmp_path)
    assert (engine_sync["kind"], engine_sync["engine"], engine_sync["phase"]) == ("engine", 1, "during_sync")
    assert (engine_sync["iteration"], engine_sync["policy_version"]) == (1, 1)
    # well within cluster.sync_timeout_s (120 s), which an engine left waiting in the old group would wait out
    print(f"\nrecovered from the engine lost mid-sync in {engine_sync['recover_s']} s")
    assert engine_sync["recover_s"] < 60, engine_sync
    assert (engine_mid["kind"], engine_mid["engine"], engine_mid["phase"]) == ("engine", 1, "rollout")
    assert (engine_mid["iteration"], engine_mid["policy_version"], engine_mid["engine_policy_version"]) == (2, 1, 1)
    assert (engine_between["engine"], engine_between["phase"], engine_between["iteration"]) == (0, "between_rollouts", 3)
    assert engine_between["policy_version"] == 3  # re-joined, then received the update of iteration 3
    assert (trainer["kind"], trainer["iteration"], trainer["resumed_from_iteration"]) == ("trainer", 4, 3)
    assert trainer["policy_version"] == 3 and trainer["checkpoint"].endswith("iter_000003")
    seen = [json.loads(line) for line in (out / "prompt_order.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in seen] == [1, 2, 3, 4, 4]  # iteration 4 ran twice ...
    assert seen[3]["problems"] == seen[4]["problems"]  # ... on the same prompts
    assert (out / "checkpoints" / "iter_000004" / "trainer" / "hf" / "config.json").exists()
