"""Recovery from a dead trainer worker, and the record of every restart (engines' and the trainer's).

Engine restarts are handled inside the fleet (a chunk re-issued, `policy_sync` re-syncs the engine); a trainer worker
that dies makes Ray Train restart the whole group, and `recover_trainer` brings the run back to its last checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ngrpo_ray.config import flatten
from ngrpo_ray.distributed import reservation
from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.distributed.trainer_config import TrainerRestarted
from ngrpo_ray.tracking.mlflow_run import MlflowRun
from ngrpo_ray.training.iteration_log import IterationLog
from ngrpo_ray.training.run_state import RunState, latest_checkpoint, load_checkpoint

if TYPE_CHECKING:
    from ngrpo_ray.distributed.session import Session


class RestartLog:
    """This session's engine restarts (kept by the fleet) and trainer restarts: counted in every iteration's metrics,
    and written to MLflow (restarts.json, tags) whenever there are new ones."""

    def __init__(self, fleet: RolloutFleet, mlflow: MlflowRun, out: Path):
        self.fleet, self.mlflow, self.out = fleet, mlflow, out
        self.trainer_restarts: list[dict] = []
        self.restarts_logged = 0

    def metrics(self) -> dict[str, float]:
        return {"fault/engine_restarts": float(len(self.fleet.restarts)),  # cumulative over this session
                "fault/trainer_restarts": float(len(self.trainer_restarts))}

    def log(self) -> None:
        """restarts.json (this session's engine and trainer restarts) as an artifact, when there are new ones."""
        restarts = self.fleet.restarts + self.trainer_restarts
        if len(restarts) > self.restarts_logged:
            self.restarts_logged = len(restarts)
            path = self.out / "restarts.json"
            path.write_text(json.dumps(sorted(restarts, key=lambda r: r["time"]), indent=2))
            self.mlflow.log_artifact(path)
            self.mlflow.set_tag("fault.engine_restarts", len(self.fleet.restarts))
            self.mlflow.set_tag("fault.trainer_restarts", len(self.trainer_restarts))


def recover_trainer(session: "Session", error: TrainerRestarted) -> int:
    """Ray Train restarted the trainer group (a worker died): restore the last checkpoint (or the initial model
    when there is none yet), roll the run state back to it, and send those weights to the engines. The
    iterations after that checkpoint are run again (same prompts: the order is a function of the iteration).
    Returns the iteration to continue from."""
    t0 = time.perf_counter()
    failed = session.fleet.iteration
    session.log(f"trainer worker group restarted in iteration {failed} ({error}); restoring the last checkpoint")
    hosts = session.trainer.workers  # where the colocated engines were seated
    session.trainer.recover()
    reservation.check_guests_after_restart(session.plan, hosts, session.trainer.workers)
    checkpoint = latest_checkpoint(session.out)
    if checkpoint is not None:
        session.trainer.load_checkpoint(str(checkpoint / "trainer"), "ds")
        session.state = load_checkpoint(checkpoint)
    else:
        session.state = RunState(iteration=0, policy_version=0, mlflow_run_id=session.mlflow.run_id,
                                 config=flatten(session.cfg))
    session.history = IterationLog(session.state.history)
    session.sync.open_weight_sync()  # trainer rank 0 is a new process: the old group is gone
    session.sync.sync_weights(session.state.policy_version)
    session.restarts.trainer_restarts.append({
        "kind": "trainer", "iteration": failed, "resumed_from_iteration": session.state.iteration,
        "checkpoint": str(checkpoint) if checkpoint else None, "policy_version": session.state.policy_version,
        "recover_s": round(time.perf_counter() - t0, 3), "time": time.time()})
    session.restarts.log()
    session.log(f"trainer recovered in {time.perf_counter() - t0:.0f}s; continuing from iteration "
                f"{session.state.iteration + 1} at policy version {session.state.policy_version}")
    return session.state.iteration
