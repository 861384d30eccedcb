"""Test-only fault injection: the fleet and the trainer group as subclasses that kill an engine actor or a trainer
worker process once, at a chosen moment of a training run, installed where the driver builds its components.

Production code carries no fault hooks; these subclasses use only the classes' public calls (`generate`, `collect`,
`submit`) to know where the run is, and Ray's own tools (`ray.kill` with restarts allowed) or SIGKILL to break it.
"""

from __future__ import annotations

import os
import signal
from typing import Sequence

import ray

from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.distributed.trainer_group import TrainerGroup

# Where the driver looks the two classes up when it builds a run's components.
BUILDER_MODULE = "ngrpo_ray.distributed.session"


def inject_faults(monkeypatch, engine_kills: Sequence[tuple[int, int, str]] = (),
                  trainer_kills: Sequence[tuple[int, int]] = (), interrupts: Sequence[int] = (),
                  sync_kills: Sequence[tuple[int, int]] = ()) -> None:
    """engine_kills: (iteration, engine, phase), iteration 1-based as the fleet's `iteration`; phase "rollout": right
    after that iteration's chunks were issued (the engine dies mid-rollout), "train": once the rollout was collected,
    while the trainer updates. trainer_kills: (policy_version, rank): that rank's process is SIGKILLed (as the kernel's
    OOM killer would) right after the update to that policy version was sent. interrupts: policy versions at whose
update the driver process gets SIGTERM (as from `ray job stop`), right after the update was sent. sync_kills:
(policy_version, engine): that engine is killed (Ray restarts it) as the weight sync of that version begins, so rank
0 starts sending to a group with a dead member. Each fault fires once."""
    fired: set = set()
    fleets: list = []  # the run's fleet, for the trainer's sync faults

    class EngineKillingFleet(RolloutFleet):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fleets.append(self)

        def _kill(self, phase: str) -> None:
            for fault in engine_kills:
                iteration, engine, at = fault
                if fault not in fired and self.iteration == iteration and at == phase:
                    fired.add(fault)
                    ray.kill(self.engines[engine], no_restart=False)  # Ray restarts it

        def generate(self, *args, **kwargs):
            chunks = super().generate(*args, **kwargs)
            self._kill("rollout")
            return chunks

        def collect(self, *args, **kwargs):
            out = super().collect(*args, **kwargs)
            self._kill("train")
            return out

    class WorkerKillingTrainer(TrainerGroup):
        def submit(self, op, ranks=None, **kwargs):
            for fault in sync_kills:
                version, engine = fault
                if op == "sync_weights" and fault not in fired and kwargs.get("version") == version:
                    fired.add(fault)
                    ray.kill(fleets[-1].engines[engine], no_restart=False)
            handle = super().submit(op, ranks, **kwargs)
            for fault in trainer_kills:
                version, rank = fault
                if op == "train" and fault not in fired and kwargs.get("version") == version:
                    fired.add(fault)
                    os.kill(self.workers[rank]["pid"], signal.SIGKILL)
            for version in interrupts:
                if op == "train" and ("interrupt", version) not in fired and kwargs.get("version") == version:
                    fired.add(("interrupt", version))
                    os.kill(os.getpid(), signal.SIGTERM)  # the driver turns it into KeyboardInterrupt
            return handle

    monkeypatch.setattr(f"{BUILDER_MODULE}.RolloutFleet", EngineKillingFleet)
    monkeypatch.setattr(f"{BUILDER_MODULE}.TrainerGroup", WorkerKillingTrainer)
