"""Run the training driver on a local Ray cluster and read back what MLflow recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient


@dataclass
class RecordedRun:
    summary: dict
    client: MlflowClient
    run: object  # mlflow.entities.Run

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric, in logging order."""
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def steps(self, key: str) -> list[int]:
        return [step for step, _ in self.history(key)]

    def artifacts(self, folder: str | None = None) -> set[str]:
        return {a.path for a in self.client.list_artifacts(self.run_id, folder)}

    def json_artifact(self, path: str, into: Path):
        return json.loads(Path(self.client.download_artifacts(self.run_id, path, str(into))).read_text())


def train_and_read(cfg, **train_kwargs) -> RecordedRun:
    """`train(cfg)` then `ray.shutdown()` (always), and the MLflow run it wrote."""
    from ngrpo_ray.distributed.driver import train

    try:
        summary = train(cfg, **train_kwargs)
    finally:
        ray.shutdown()
    client = MlflowClient(summary["tracking_uri"])
    return RecordedRun(summary, client, client.get_run(summary["run_id"]))
