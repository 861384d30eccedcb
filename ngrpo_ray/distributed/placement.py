"""Where engines and trainers run: Ray placement groups built from the config, and `init_ray`.

Every engine and trainer worker asks for its resources through one placement group. A pending placement group is
what the Ray autoscaler (cluster launcher or KubeRay) reads as demand, so asking this way is what makes GPU nodes
start; asking actor by actor would scale the cluster up piecemeal and could deadlock half-placed.

Two layouts (`cluster.placement`):
- "disaggregated": engines and trainers get their own bundles. Engine bundles are one per tensor-parallel rank,
  `{"CPU": rollout.engine_cpus, "GPU": rollout.engine_gpus}` (so engine_cpus/engine_gpus are per TP rank); then one
  trainer bundle per worker, `{"CPU": trainer_cpus, "GPU": 1}`.
- "colocated": max(trainer.num_workers, num_engines * tensor_parallel_size) shared bundles of one GPU each; trainer
  worker i and engine rank i share bundle i, each asking for a GPU fraction (COLOCATED_*_GPU_SHARE). Ray's fractions
  only decide placement: the memory split on the shared GPU is rollout.gpu_memory_utilization.
GPUs are requested only when trainer.use_gpu is true, so the CPU presets (use_gpu false) run on a CPU-only cluster
whatever rollout.engine_gpus says.

Waiting for the group has a deadline (`cluster.placement_timeout_s`): when it passes, the group is removed (so the
autoscaler stops chasing it) and PlacementTimeoutError names the bundles, what the cluster has, and the key.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ngrpo_ray.config.schema import Config

logger = logging.getLogger(__name__)

Bundle = dict[str, float]

# Ray Train's default per worker; there is no config key for it yet (see the cluster README).
DEFAULT_TRAINER_CPUS = 1.0
# Shares of one shared GPU bundle in colocated mode; they must sum to at most 1 for Ray to co-schedule both.
COLOCATED_TRAINER_GPU_SHARE = 0.5
COLOCATED_ENGINE_GPU_SHARE = 0.5
TIMEOUT_KEY = "cluster.placement_timeout_s"


class PlacementTimeoutError(TimeoutError):
    """The placement group could not be reserved within cluster.placement_timeout_s."""


@dataclass(frozen=True)
class Slot:
    """One actor's seat: which bundle of the group, and what it asks for inside it."""

    bundle_index: int
    num_cpus: float
    num_gpus: float


@dataclass(frozen=True)
class PlacementPlan:
    placement: Literal["colocated", "disaggregated"]
    bundles: list[Bundle]
    strategy: str
    engine_slots: list[list[Slot]]  # per engine, one slot per tensor-parallel rank
    trainer_slots: list[Slot]  # per trainer worker


def _uses_gpu(cfg: Config) -> bool:
    return bool(cfg.trainer.use_gpu)


def _bundle(cpus: float, gpus: float) -> Bundle:
    # Ray rejects zero-valued entries in bundles, so a CPU-only bundle has no "GPU" key at all.
    out: Bundle = {"CPU": float(cpus)}
    if gpus > 0:
        out["GPU"] = float(gpus)
    return out


def engine_bundles(cfg: Config) -> list[Bundle]:
    """Disaggregated engine bundles: num_engines * tensor_parallel_size, one per TP rank."""
    gpus = cfg.rollout.engine_gpus if _uses_gpu(cfg) else 0.0
    ranks = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
    return [_bundle(cfg.rollout.engine_cpus, gpus) for _ in range(ranks)]


def trainer_bundles(cfg: Config, trainer_cpus: float = DEFAULT_TRAINER_CPUS) -> list[Bundle]:
    """Disaggregated trainer bundles: one per worker, a whole GPU each when trainer.use_gpu."""
    gpus = 1.0 if _uses_gpu(cfg) else 0.0
    return [_bundle(trainer_cpus, gpus) for _ in range(cfg.trainer.num_workers)]


def colocated_bundles(cfg: Config, trainer_cpus: float = DEFAULT_TRAINER_CPUS) -> list[Bundle]:
    """Shared bundles: bundle i holds trainer worker i (if any) and engine rank i (if any) on one GPU."""
    ranks = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
    workers = cfg.trainer.num_workers
    gpus = 1.0 if _uses_gpu(cfg) else 0.0
    return [
        _bundle((trainer_cpus if i < workers else 0.0) + (cfg.rollout.engine_cpus if i < ranks else 0.0), gpus)
        for i in range(max(workers, ranks))
    ]


def plan_placement(cfg: Config, trainer_cpus: float = DEFAULT_TRAINER_CPUS) -> PlacementPlan:
    """Bundles of the one placement group and the seat of every engine rank and trainer worker in it."""
    tp = cfg.rollout.tensor_parallel_size
    uses_gpu = _uses_gpu(cfg)
    if cfg.cluster.placement == "colocated":
        bundles = colocated_bundles(cfg, trainer_cpus)
        engine_gpu = COLOCATED_ENGINE_GPU_SHARE if uses_gpu else 0.0
        trainer_gpu = COLOCATED_TRAINER_GPU_SHARE if uses_gpu else 0.0
        engine_slots = [
            [Slot(e * tp + r, cfg.rollout.engine_cpus, engine_gpu) for r in range(tp)]
            for e in range(cfg.rollout.num_engines)
        ]
        trainer_slots = [Slot(i, trainer_cpus, trainer_gpu) for i in range(cfg.trainer.num_workers)]
    else:
        # Each actor takes its whole bundle: engine ranks first, then trainer workers.
        bundles = engine_bundles(cfg) + trainer_bundles(cfg, trainer_cpus)
        whole = [Slot(i, b["CPU"], b.get("GPU", 0.0)) for i, b in enumerate(bundles)]
        ranks = cfg.rollout.num_engines * tp
        engine_slots = [whole[e * tp:(e + 1) * tp] for e in range(cfg.rollout.num_engines)]
        trainer_slots = whole[ranks:]
    # PACK: fill as few nodes as possible (fast NCCL inside a node) but spill to more nodes when needed.
    return PlacementPlan(cfg.cluster.placement, bundles, "PACK", engine_slots, trainer_slots)


def actor_options(pg: PlacementGroup, slot: Slot) -> dict[str, Any]:
    """Keyword arguments for `Actor.options(...)` that seat an actor in its bundle."""
    return {
        "num_cpus": slot.num_cpus,
        "num_gpus": slot.num_gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=slot.bundle_index, placement_group_capture_child_tasks=True
        ),
    }


def reserve(cfg: Config, plan: Optional[PlacementPlan] = None, name: str = "ngrpo") -> tuple[PlacementGroup, PlacementPlan]:
    """Plan from the config, create the group, and wait up to cluster.placement_timeout_s for it."""
    plan = plan or plan_placement(cfg)
    pg = create_placement_group(plan.bundles, plan.strategy, cfg.cluster.placement_timeout_s, name=name)
    return pg, plan


def create_placement_group(
    bundles: list[Bundle], strategy: str, timeout_s: float, name: str = "ngrpo"
) -> PlacementGroup:
    """Create a placement group and wait for it; on timeout remove it and raise PlacementTimeoutError."""
    pg = placement_group(bundles, strategy=strategy, name=name)
    wait_for_placement(pg, bundles, timeout_s)
    return pg


def wait_for_placement(pg: PlacementGroup, bundles: list[Bundle], timeout_s: float) -> None:
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return
    message = unplaced_message(bundles, timeout_s)
    # A pending group is autoscaler demand: drop it so a failed run does not keep GPU nodes starting.
    remove_placement_group(pg)
    raise PlacementTimeoutError(message)


def unplaced_message(bundles: list[Bundle], timeout_s: float) -> str:
    """What could not be placed, what the cluster has, and which key sets the deadline."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    never_fit = [i for i, b in enumerate(bundles) if not any(_fits(b, node) for node in nodes)]
    listed = ", ".join(f"#{i} {_fmt(b)}" for i, b in enumerate(bundles))
    lines = [
        f"placement group of {len(bundles)} bundles was not placed within {timeout_s:g} s ({TIMEOUT_KEY}).",
        f"Bundles that could not be placed: {listed}.",
    ]
    if never_fit:
        lines.append(
            "No live node could hold these even when idle: "
            + ", ".join(f"#{i} {_fmt(bundles[i])}" for i in never_fit)
            + " (on an autoscaling cluster, a node type that provides them must exist)."
        )
    lines.append(f"Cluster available resources: {_fmt(_known(ray.available_resources()))}; "
                 f"total: {_fmt(_known(ray.cluster_resources()))}.")
    lines.append(
        f"Add nodes or an autoscaling node type with these resources, lower rollout.num_engines / "
        f"trainer.num_workers / rollout.engine_gpus, or raise {TIMEOUT_KEY} if nodes are still starting."
    )
    return "\n".join(lines)


def _fits(bundle: Bundle, node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items())


def _known(resources: dict[str, float]) -> dict[str, float]:
    # Leave out Ray's internal per-node and memory entries: they make the message unreadable.
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or "memory" in k)}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def init_ray(cfg: Config, include_dashboard: Optional[bool] = None, **kwargs: Any) -> None:
    """Attach to cfg.cluster.address, else RAY_ADDRESS, else start a local cluster with cfg.cluster.num_cpus.

    A local cluster's dashboard listens on cfg.cluster.dashboard_host (127.0.0.1 by default). An existing cluster's
    dashboard was configured when it started (see cluster/README.md), so nothing about it is passed here.
    """
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # re-raised with the one hint that matters most on Ray >= 2.52
            if "auth" in str(exc).lower():
                raise RuntimeError(
                    f"could not attach to the Ray cluster at {address}: {exc}\nThe cluster uses token "
                    "authentication: set RAY_AUTH_MODE=token and provide the cluster's token through RAY_AUTH_TOKEN, "
                    "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (see cluster/README.md)."
                ) from exc
            raise
        return
    if cfg.cluster.dashboard_host not in ("127.0.0.1", "localhost"):
        logger.warning("Ray dashboard will listen on %s (cluster.dashboard_host): reachable beyond this machine",
                       cfg.cluster.dashboard_host)
    ray.init(
        num_cpus=cfg.cluster.num_cpus,
        include_dashboard=include_dashboard,
        dashboard_host=cfg.cluster.dashboard_host,
        **kwargs,
    )
