"""The policy's way from the trainer to the engines: the weight-sync group (trainer rank 0 + every engine) and the
send of each policy version, rebuilt when an engine or the trainer group was restarted."""

from __future__ import annotations

import time
from typing import Any, Callable

from ngrpo_ray.config import Config
from ngrpo_ray.distributed.placement import PlacementPlan, engines_on_trainer_gpus
from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.distributed.trainer_config import TrainerGroupError, TrainerRestarted
from ngrpo_ray.distributed.trainer_group import TrainerGroup
from ngrpo_ray.distributed.weight_sync import GLOO_BACKEND
from ngrpo_ray.training.peak_memory import max_over_ranks


class PolicySync:
    def __init__(self, cfg: Config, plan: PlacementPlan, trainer: TrainerGroup, fleet: RolloutFleet,
                 log: Callable[[str], Any] = print):
        self.cfg, self.plan, self.trainer, self.fleet, self.log = cfg, plan, trainer, fleet, log

    def open_weight_sync(self) -> None:
        """(Re)build the weight transfer (vLLM's API): trainer rank 0 plus every engine. Joining closes a member's
        previous one."""
        backend = self.trainer.open_weight_sync(self.fleet.engines, timeout_s=self.cfg.cluster.sync_timeout_s,
                                                bucket_mb=self.cfg.cluster.sync_bucket_mb,
                                                same_gpu=engines_on_trainer_gpus(self.cfg.cluster.placement,
                                                                                 self.cfg.trainer.use_gpu),
                                                engine_tp=self.cfg.rollout.tensor_parallel_size)
        detail = ""
        if backend == GLOO_BACKEND:  # say whether the bytes go through shared memory, or by gloo and why
            how, note = self.trainer.sync_transport, self.trainer.sync_transport_note
            detail = f", bytes by {how}" + (f" ({note})" if how == "gloo" and note else "")
        self.log(f"weight sync open: {backend} to {len(self.fleet.engines)} engine(s){detail}")

    def sync_weights(self, version: int) -> tuple[Any, list]:
        """Send the trainer's weights to every engine as `version`; returns (trainer stats, engine stats).
        Engines Ray restarted since the last look (say, killed during the train step) left the sync group: it is
        rebuilt first, and the restart recorded. An engine that dies during the sync fails it; once Ray has restarted
        it, the group is rebuilt and the whole sync sent again (the other engines may hold part of the new weights)."""
        t0 = time.perf_counter()
        restarted = self.fleet.find_restarted()  # health() reads nothing from a sleeping engine's GPU
        if self.plan.sleep_engines:  # colocated on GPU: weights back for the load; the KV cache only after it
            self.fleet.wake_up(["weights"])
        if restarted:
            self.log(f"engine(s) {restarted} restarted outside a rollout; rebuilding the weight-sync group")
            self.open_weight_sync()
            for engine in restarted:
                self.fleet.record_restart(engine, "between_rollouts", version, version, t0)
        try:
            sent = self._send(version)
        except TrainerRestarted:
            raise  # a trainer worker died: the driver restores the last checkpoint
        except TrainerGroupError as failure:
            try:
                self.trainer.close_weight_sync()  # no engine is left waiting in the failed transfer
            except TrainerGroupError as stuck:
                # rank 0 did not come back from the failed send: an NCCL broadcast to a dead engine can block for good
                raise TrainerGroupError(
                    f"the weight sync to version {version} failed ({str(failure).splitlines()[0][:200]}) and the "
                    f"trainer did not answer afterwards ({stuck}); the checkpoints hold the run: resume it with "
                    "--resume") from failure
            restarted = self.fleet.find_restarted()
            if not restarted:
                raise
            self.log(f"engine(s) {restarted} died during the weight sync to version {version} "
                     f"({str(failure).splitlines()[0][:200]}); rebuilding the group and sending again")
            self.open_weight_sync()
            for engine in restarted:
                self.fleet.record_restart(engine, "during_sync", version, version, t0)
            sent = self._send(version)
        if self.plan.sleep_engines:
            self.fleet.wake_up(["kv_cache"])  # the trainer emptied its CUDA cache after the sync: room for it
        self.fleet.serving_version = int(version)  # an asynchronous chunk re-issued from now on draws with it
        return sent, sent["engines"]

    def _send(self, version: int) -> dict:
        """One sync on every trainer rank: rank 0's stats with the largest rank's memory figures."""
        return max_over_ranks(self.trainer.wait(self.trainer.start_sync(version),
                                                timeout_s=self.cfg.cluster.sync_timeout_s))

    def resync_engines(self, engines: list[int], version: int) -> None:
        """The fleet's hook after engines restarted (they hold the initial model and are outside the sync group,
        which cannot take a new member): rebuild the group and send the current weights, the trainer's, again."""
        self.log(f"engine(s) {engines} restarted; re-syncing the fleet to policy version {version}")
        self.open_weight_sync()
        self.sync_weights(version)
