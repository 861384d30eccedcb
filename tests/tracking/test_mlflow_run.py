"""MLflow tracking against a real local store, read back through MLflow's own client."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ngrpo_ray.tracking.mlflow_run import MlflowRun, tracking_uri_for
from ngrpo_ray.tracking.plots import line_plot, stacked_bars


def test_params_metrics_artifacts_and_resume(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri_for(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    run = MlflowRun(uri, "exp", run_name="r", artifact_root=tmp_path / "artifacts")
    run.log_params({"mixing.rho": 0.1, "long": "x" * 10000})
    run.log_metrics({"reward/mean": 0.25, "val/mean@n": 0.5}, step=1)
    plot = line_plot(tmp_path / "reward.png", "reward", {"reward": [(1, 0.25), (2, 0.5)]})
    run.log_artifact(plot, "plots")
    run.finish("KILLED")

    resumed = MlflowRun(uri, "exp", run_id=run.run_id)
    resumed.log_params({"mixing.rho": 0.2})  # immutable: the first value stays
    resumed.log_metrics({"reward/mean": 0.75}, step=2)
    resumed.finish()

    client = MlflowClient(uri)
    data = client.get_run(run.run_id).data
    assert data.params["mixing.rho"] == "0.1"
    assert data.params["long"].endswith("...[cut]")
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "reward/mean")] == [(1, 0.25), (2, 0.75)]
    assert client.get_metric_history(run.run_id, "val/mean_at_n")[0].value == 0.5
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/reward.png"]
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_env_uri_is_honoured(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking_uri_for(tmp_path / "run") == f"sqlite:///{tmp_path}/other.db"
    assert tracking_uri_for(tmp_path / "run", "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_resuming_a_missing_run_fails(tmp_path: Path):
    with pytest.raises(Exception):
        MlflowRun(tracking_uri_for(tmp_path, f"sqlite:///{tmp_path}/m.db"), "exp", run_id="0" * 32)


def test_plots_are_png(tmp_path: Path):
    p = stacked_bars(tmp_path / "t.png", "timing", {"gen": [1.0, 2.0], "train": [0.5, 0.5]})
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
