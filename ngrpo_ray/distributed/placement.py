"""Where engines and trainers run: one plan from the config for both layouts (the reservation is in
`reservation.py`, the capacity check in `cluster_capacity.py`, attaching to Ray in `ray_init.py`).

The plan (`plan_placement`) decides every seat; the driver prints it at start and logs it to MLflow.

- "colocated": one bundle per trainer GPU, `{"CPU": trainer_cpus + engine_cpus, "GPU": 1}`. Trainer rank i owns bundle
  i. Engine ranks (num_engines x tensor_parallel_size, at most trainer.num_workers) ride as guests on the LAST trainer
  ranks' GPUs: they claim no Ray resources of their own (their share is inside the host rank's bundle), are pinned to
  the host's node, and see only the host's GPU (CUDA_VISIBLE_DEVICES); a tensor-parallel engine sees its hosts' GPUs,
  one per rank, which must share a node. Engines sleep (vLLM sleep mode, level 1) during the update. Filling GPUs
  from the last one gives trainer rank 0's GPU (rank 0 also drives the weight sync) an engine only when every GPU
  hosts one.
- "disaggregated": one bundle per engine, `{"CPU": engine_cpus x TP, "GPU": TP}`, in a placement group of the
  engines' own, and trainer bundles `{"CPU": trainer_cpus, "GPU": 1}`; any split the user sets. A bundle never spans
  nodes, so a split engine's ranks share one node (NVLink), and the engine actor claims the whole bundle: vLLM's
  multiprocess executor starts one worker per GPU it sees.

Why the trainer's bundles are not in our placement group: Ray Train 2.60 (Train V2, the default) always creates its
worker group's placement group itself, `[resources_per_worker] * num_workers` with `ScalingConfig.placement_strategy`
(ray/train/v2/_internal/execution/worker_group/worker_group.py, `_create_placement_group`); a worker group cannot join
an existing one. So the plan hands Ray Train its `resources_per_worker` and strategy, and guests (colocated engines)
are seated next to the trainer ranks after the group starts. `plan.bundles` is the whole layout (what the autoscaler
is asked for, in total); `reserve_layout` reserves it in one group, which the layout tests use to check every seat.

Weights reach colocated engines by CUDA IPC (`transport == "ipc"`, vLLM's ipc weight transfer, the peers' way): every
trainer rank exposes its copy of each tensor on its own GPU, the handles are all-gathered over the trainer's group and
rank 0 ships them to every engine, whose workers each open the handle of their own GPU. So any GPU, rank 0's
included, can host an engine or a tensor-parallel shard of one. Disaggregated engines get NCCL from trainer rank 0;
one NCCL group may never hold two members on one device (`check_sync_devices`). One fleet has one transport. On CPU
(gloo, no devices) the rules hold trivially and the plan says so.

A layout the cluster can never hold fails at once (`check_capacity`): GPUs and CPUs asked against what the cluster can
have, which is the autoscaler's maximum (node types' max_workers x resources) when Ray knows it, else the current
total. GPUs are requested only when trainer.use_gpu is true, so CPU presets run on CPU-only clusters.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

from ngrpo_ray.config.schema import Config

Bundle = dict[str, float]

# Ray Train's default per worker; there is no config key for it yet (see the cluster README).
DEFAULT_TRAINER_CPUS = 1.0


class PlacementInfeasibleError(RuntimeError):
    """The layout asks for more than the cluster can ever have (autoscaler maximum included)."""


@dataclass(frozen=True)
class Slot:
    """One actor's seat: which bundle of the layout, and what it claims there (guests claim nothing)."""

    bundle_index: int
    num_cpus: float
    num_gpus: float
    host_rank: Optional[int] = None  # colocated engines: the trainer rank whose GPU (and bundle) they share
    gpu_index: int = 0  # which of the bundle's GPUs (a split engine's rank r in its engine bundle)


@dataclass(frozen=True)
class PlacementPlan:
    placement: Literal["colocated", "disaggregated"]
    uses_gpu: bool
    bundles: list[Bundle]  # the whole layout, one bundle per GPU on GPU runs
    roles: list[list[str]]  # who sits in each bundle ("trainer 3", "engine 0 tp 0")
    strategy: str
    trainer_resources: Bundle  # Ray Train's resources_per_worker (it builds its own group from these)
    engine_bundles: list[Bundle]  # the engines' own placement group (disaggregated; empty when colocated)
    engine_slots: list[list[Slot]]  # per engine, one slot per tensor-parallel rank (bundle index into `bundles`)
    trainer_slots: list[Slot]  # per trainer rank
    transports: list[str]  # per engine: how it receives weights ("nccl", "ipc", or "gloo" on CPU)
    sleep_engines: bool  # colocated on GPU: engines sleep during the update
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0.0) for b in self.bundles)

    @property
    def cpus(self) -> float:
        return sum(b.get("CPU", 0.0) for b in self.bundles)

    def to_dict(self) -> dict:
        return asdict(self) | {"gpus": self.gpus, "cpus": self.cpus}

    def describe(self) -> str:
        """The plan as the driver prints it at start."""
        lines = [f"placement plan: {self.placement}, {len(self.bundles)} bundles, {self.gpus:g} GPUs, "
                 f"{self.cpus:g} CPUs ({self.strategy}); trainer workers ask Ray Train for "
                 f"{_fmt(self.trainer_resources)} each"]
        for i, (bundle, roles) in enumerate(zip(self.bundles, self.roles)):
            lines.append(f"  bundle {i} {_fmt(bundle)}: {', '.join(roles)}")
        lines.append("  weight sync: " + ", ".join(f"engine {e} by {t}" for e, t in enumerate(self.transports)))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bundle(cpus: float, gpus: float) -> Bundle:
    # Ray rejects zero-valued entries in bundles, so a CPU-only bundle has no "GPU" key at all.
    out: Bundle = {"CPU": float(cpus)}
    if gpus > 0:
        out["GPU"] = float(gpus)
    return out


def engine_ranks(cfg: Config) -> int:
    return cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size


def plan_placement(cfg: Config, trainer_cpus: float = DEFAULT_TRAINER_CPUS) -> PlacementPlan:
    """Bundles of the layout, the seat of every trainer rank and engine rank, and each engine's weight transport."""
    uses_gpu = bool(cfg.trainer.use_gpu)
    gpu = 1.0 if uses_gpu else 0.0
    tp, n_eng, workers = cfg.rollout.tensor_parallel_size, cfg.rollout.num_engines, cfg.trainer.num_workers
    ranks = engine_ranks(cfg)
    e_cpus = cfg.rollout.engine_cpus
    notes: list[str] = []
    if cfg.cluster.placement == "colocated":
        if ranks > workers:
            raise PlacementInfeasibleError(
                f"colocated layout: {ranks} engine ranks (rollout.num_engines x rollout.tensor_parallel_size) but "
                f"{workers} trainer GPUs (trainer.num_workers): every engine rank needs a trainer rank's GPU to share")
        per = _bundle(trainer_cpus + e_cpus, gpu)
        bundles = [dict(per) for _ in range(workers)]
        roles = [[f"trainer {i}"] for i in range(workers)]
        trainer_slots = [Slot(i, per["CPU"], gpu) for i in range(workers)]
        first_host = workers - ranks  # engines fill the last GPUs: rank 0's GPU is taken only when all are
        engine_slots = []
        for e in range(n_eng):
            seats = []
            for r in range(tp):
                host = first_host + e * tp + r
                seats.append(Slot(host, 0.0, 0.0, host_rank=host))
                roles[host].append(f"engine {e} tp {r}")
            engine_slots.append(seats)
        engine_bundle_list: list[Bundle] = []
        trainer_resources = dict(per)
        if uses_gpu:
            notes.append("engines sleep (vLLM sleep mode, level 1) during the update and wake before the weight load")
        else:
            notes.append("CPU: engines do not sleep (vLLM's sleep mode needs CUDA); the memory split is "
                         "rollout.kv_cache_space_gib")
    else:
        engine_bundle = _bundle(e_cpus * tp, gpu * cfg.rollout.engine_gpus * tp)
        engine_bundle_list = [dict(engine_bundle) for _ in range(n_eng)]
        trainer_resources = _bundle(trainer_cpus, gpu)
        bundles = engine_bundle_list + [dict(trainer_resources) for _ in range(workers)]
        roles = [[f"engine {e} tp {r}" for r in range(tp)] for e in range(n_eng)] + [[f"trainer {i}"]
                                                                                      for i in range(workers)]
        # the engine actor (rank 0's slot) claims the whole bundle; its other ranks are its executor's processes
        engine_slots = [[Slot(e, engine_bundle["CPU"], engine_bundle.get("GPU", 0.0)) if r == 0
                         else Slot(e, 0.0, 0.0, gpu_index=r) for r in range(tp)] for e in range(n_eng)]
        trainer_slots = [Slot(n_eng + i, trainer_resources["CPU"], gpu) for i in range(workers)]
    transports = [weight_transport(cfg.cluster.sync_backend, uses_gpu,
                                   engines_on_trainer_gpus(cfg.cluster.placement, uses_gpu))] * n_eng
    if not uses_gpu:
        notes.append("CPU: the weight-sync group is gloo between processes; no device is shared")
    # PACK: fill as few nodes as possible (fast NCCL inside a node) but spill to more nodes when needed.
    plan = PlacementPlan(cfg.cluster.placement, uses_gpu, bundles, roles, "PACK", trainer_resources,
                         engine_bundle_list, engine_slots, trainer_slots, transports,
                         sleep_engines=uses_gpu and cfg.cluster.placement == "colocated", notes=notes)
    check_sync_devices(plan)
    return plan


def engines_on_trainer_gpus(placement: str, use_gpu: bool) -> bool:
    """Colocated on GPU: every engine rank is a guest on a trainer rank's GPU, so CUDA IPC can carry its weights (the
    plan's transports, the engines' vLLM weight-transfer backend and the trainer's all follow from it)."""
    return bool(use_gpu) and placement == "colocated"


def weight_transport(sync_backend: str, use_gpu: bool, same_gpu: bool) -> str:
    """cluster.sync_backend -> how the engines receive weights: "gloo" (host memory: every CPU run, or asked for),
    "nccl" (asked for by name, or engines on GPUs of their own) or "ipc" (``same_gpu``: engines_on_trainer_gpus).
    weight_sync.choose_sync_backend names the vLLM backend of it and checks the setting."""
    if not use_gpu or sync_backend == "gloo":  # gloo goes through host memory: any seat works
        return "gloo"
    if sync_backend == "nccl":
        return "nccl"
    return "ipc" if same_gpu else "nccl"


def check_sync_devices(plan: PlacementPlan) -> None:
    """One transport per fleet. CUDA IPC needs every engine rank on a trainer rank's GPU (it opens the handle that
    GPU's trainer rank exposed); the NCCL weight-sync group (trainer rank 0 + engine ranks) never holds two members on
    one GPU."""
    if not plan.uses_gpu:
        return
    if len(set(plan.transports)) > 1:
        raise PlacementInfeasibleError(
            f"one fleet receives weights one way; the plan mixes {sorted(set(plan.transports))}")
    members = [("trainer 0", _device(plan.trainer_slots[0]))]
    for e, (seats, transport) in enumerate(zip(plan.engine_slots, plan.transports)):
        if transport == "ipc" and any(s.host_rank is None for s in seats):
            raise PlacementInfeasibleError(f"engine {e} is not on a trainer rank's GPU: CUDA IPC (vLLM's ipc weight "
                                           "transfer) needs cluster.placement=colocated")
        if transport == "nccl":
            members += [(f"engine {e} tp {r}", _device(s)) for r, s in enumerate(seats)]
    seen: dict[tuple[int, int], str] = {}
    for who, device in members:
        if device in seen:
            raise PlacementInfeasibleError(
                f"{who} shares a GPU (bundle {device[0]}, GPU {device[1]} of it) with {seen[device]}: one NCCL group "
                "may not hold two members on one device. Colocated engines receive weights by CUDA IPC with "
                "cluster.sync_backend=auto, or use fewer engine ranks than trainer GPUs")
        seen[device] = who


def _device(slot: Slot) -> tuple[int, int]:
    return slot.bundle_index, slot.gpu_index


def write_plan(plan: PlacementPlan, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)


def plan_params(plan: PlacementPlan) -> dict[str, Any]:
    """A few MLflow params; the full plan goes in as the placement_plan.json artifact."""
    return {"plan.layout": plan.placement, "plan.gpus": plan.gpus, "plan.cpus": plan.cpus,
            "plan.bundles": len(plan.bundles), "plan.transports": ",".join(plan.transports),
            "plan.sleep_engines": plan.sleep_engines}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"
