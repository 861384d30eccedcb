"""`ray job submit` end to end: a local head with token authentication, a 2-iteration training job uploaded with
`--working-dir`, SUCCEEDED, and the run read back from MLflow with metrics at steps 1 and 2.

The head is started from the venv's `ray` with the venv first on PATH, so the job's `python` is the venv's. Teardown
stops only this head's processes (found by its private temp dir, plus their descendants): `ray stop --force` would
kill every Ray process on the machine, other users' clusters included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support.local_head import free_port, stop_head
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # the interpreter running the tests: its `ray` and `python` serve the job
# Not uploaded: the venv, VCS data, caches and run outputs (Ray also honours .gitignore; these are explicit anyway).
EXCLUDES = [".venv", ".git", "runs", "mlruns", ".hypothesis", ".pytest_cache", "**/__pycache__", "*.egg-info"]


def _cluster_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # the token is ~/.ray/auth_token (written by `ray start` when missing)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_head():
    """A local head on loopback with free ports; yields (dashboard address, env for clients)."""
    # A short path of its own: Ray's socket paths live under it (108-byte limit) and teardown finds the head by it.
    temp_dir = tempfile.mkdtemp(prefix="ngrpo_rjs_", dir="/tmp")
    dashboard = free_port()
    env = _cluster_env()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--port={free_port()}", f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _write_data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    return path


def test_ray_job_submit_trains_two_iterations_into_mlflow(ray_head, tmp_path):
    address, env = ray_head
    model = write_tiny_chat_model(tmp_path / "tiny_chat")
    data = _write_data(tmp_path / "data.jsonl")
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    overrides = [
        f"model.path={model}", f"data.train={data}", f"data.validation={data}", "data.limit=4",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.prompts_per_iteration=2",
        "trainer.mini_batches=1", "trainer.micro_batch_size=2", "trainer.iterations=2",
        "trainer.validate_every=0", "trainer.validate_before=false", "tracking.plots=false",
        "rollout.engine_cpus=1", "rollout.kv_cache_space_gib=0.25", "eval.max_new_tokens=6", "eval.grade_workers=1",
        f"trainer.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri={uri}", "tracking.experiment=job_submit", "tracking.run_name=job_submit_test",
    ]
    submission_id = f"ngrpo-test-{uuid.uuid4().hex[:8]}"
    ray_bin = str(VENV_BIN / "ray")
    submit = [ray_bin, "job", "submit", "--address", address, "--submission-id", submission_id,
              "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
              "--", "python", "workflows/train.py", "--config", "cpu_default", *overrides]
    # Blocks, streaming the job's logs, until the job ends.
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
    logs = f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    # The job's status through the Jobs API (a fresh process, so the client reads RAY_AUTH_MODE from its env).
    query = ("import sys; from ray.job_submission import JobSubmissionClient; "
             "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    status = subprocess.run([sys.executable, "-c", query, address, submission_id], env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.stdout.strip().splitlines()[-1:] == ["SUCCEEDED"], \
        f"job status:\n{status.stdout}\n{status.stderr}\nsubmit output:\n{logs}"
    assert done.returncode == 0, logs

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("job_submit")
    assert experiment is not None, f"no MLflow experiment 'job_submit' in {uri}\n{logs}"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["job_submit_test"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("reward/mean", "policy_version", "time/total_s", "sync/bytes"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert [m.value for m in client.get_metric_history(run.info.run_id, "policy_version")] == [1.0, 2.0]
    assert run.data.params["trainer.iterations"] == "2"
    assert (tmp_path / "out" / "summary.json").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["run_id"] == run.info.run_id
