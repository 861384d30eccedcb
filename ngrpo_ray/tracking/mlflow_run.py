"""One MLflow run per training (or evaluation) run, resumable by run id.

The store is `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else a SQLite file in the run folder, so a local
run needs no server and a cluster run can point at one. Params are the flattened resolved config, logged once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow.tracking import MlflowClient

_MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value (8000 in 3.x); longer values are cut with a marker


def tracking_uri_for(run_dir: str | Path, configured: str | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(run_dir).expanduser().resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class MlflowRun:
    """Thin wrapper over MlflowClient: explicit run id, no global active-run state (safe with resume and Ray)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None, run_id: str | None = None,
                 artifact_root: str | Path | None = None):
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if artifact_root is not None and tracking_uri.startswith("sqlite"):
                location = Path(artifact_root).expanduser().resolve().as_uri()
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        if run_id is not None:
            run = self.client.get_run(run_id)  # raises if it does not exist: resuming a vanished run is an error
            if run.info.lifecycle_stage != "active":
                raise RuntimeError(f"MLflow run {run_id} is {run.info.lifecycle_stage}; cannot resume it")
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        for key, value in params.items():
            text = str(value)
            text = text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 12] + "...[cut]"
            if key in existing:
                continue  # params are immutable in MLflow; a resumed run keeps the first value
            self.client.log_param(self.run_id, key, text)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            value = float(value)
            if math.isnan(value) or math.isinf(value):
                # MLflow stores NaN but many UIs hide it; keep it (an honest NaN beats a silent 0) and count it.
                batch.append(Metric("nonfinite_metric_count", 1.0, now, step))
            batch.append(Metric(_safe_key(key), value, now, step))
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[i: i + 900])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, _safe_key(key))]

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _safe_key(key: str) -> str:
    # MLflow keys allow alphanumerics, _ - . space / only; "mean@n" becomes "mean_at_n".
    return key.replace("@", "_at_")
