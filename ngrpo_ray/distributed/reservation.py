"""Reserving a plan's seats on Ray: placement groups (created and waited for, removed on timeout), the `options(...)`
that seat each actor in its bundle or next to its host trainer rank, and the check after a trainer restart."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ngrpo_ray.config.schema import Config
from ngrpo_ray.distributed.cluster_capacity import _fits, check_capacity
from ngrpo_ray.distributed.placement import (Bundle, PlacementInfeasibleError, PlacementPlan, Slot, _fmt,
                                             plan_placement)

TIMEOUT_KEY = "cluster.placement_timeout_s"


class PlacementTimeoutError(TimeoutError):
    """The placement group could not be reserved within cluster.placement_timeout_s."""


def reserve_engines(cfg: Config, plan: PlacementPlan, name: str = "ngrpo-engines") -> Optional[PlacementGroup]:
    """The engines' own placement group (disaggregated); None when they are guests of the trainer (colocated)."""
    if not plan.engine_bundles:
        return None
    return create_placement_group(plan.engine_bundles, plan.strategy, cfg.cluster.placement_timeout_s, name=name)


def reserve_layout(cfg: Config, plan: Optional[PlacementPlan] = None, name: str = "ngrpo") -> tuple[PlacementGroup,
                                                                                                     PlacementPlan]:
    """The whole layout (trainer and engine bundles) in one group: what the autoscaler must provide in total."""
    plan = plan or plan_placement(cfg)
    check_capacity(plan)
    pg = create_placement_group(plan.bundles, plan.strategy, cfg.cluster.placement_timeout_s, name=name)
    return pg, plan


reserve = reserve_layout  # the name the cluster docs use


def actor_options(pg: PlacementGroup, slot: Slot) -> dict[str, Any]:
    """Keyword arguments for `Actor.options(...)` that seat an actor in its bundle."""
    return {
        "num_cpus": slot.num_cpus,
        "num_gpus": slot.num_gpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=slot.bundle_index, placement_group_capture_child_tasks=True
        ),
    }


def guest_options(hosts: Sequence[dict], uses_gpu: bool) -> dict[str, Any]:
    """Options seating a colocated engine next to its host trainer ranks (`hosts`: one rank's ping per tensor-parallel
    rank of the engine: node_id, gpu_ids).

    The guest claims nothing (its share is in the hosts' bundles), is pinned to the hosts' node, and sees only the
    hosts' GPUs, in TP-rank order (vLLM's multiprocess executor gives worker r the r-th visible GPU). Not in the
    hosts' placement group on purpose: Ray Train removes that group when it restarts the worker group, which would
    kill the engine too."""
    nodes = {h["node_id"] for h in hosts}
    if len(nodes) > 1:
        raise PlacementInfeasibleError(
            f"a tensor-parallel engine's {len(hosts)} ranks ride on trainer ranks of {len(nodes)} nodes; one engine's "
            "ranks must share a node. Keep rollout.tensor_parallel_size within a node's GPUs, or use "
            "cluster.placement=disaggregated (one bundle per engine)")
    options: dict[str, Any] = {
        "num_cpus": 0, "num_gpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=hosts[0]["node_id"], soft=False),
    }
    if uses_gpu:
        # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for actors with num_gpus=0 (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO)
        visible = [str(g) for h in hosts for g in h["gpu_ids"]]
        options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ",".join(visible)}}
    return options


def engine_actor_options(plan: PlacementPlan, engine_pg: Optional[PlacementGroup],
                         trainer_workers: Sequence[dict]) -> list[dict[str, Any]]:
    """Per engine, its `options(...)`: its bundle of the engines' group, or a guest seat on its host trainer ranks."""
    out = []
    for seats in plan.engine_slots:
        head = seats[0]  # the engine actor sits in its tensor-parallel rank 0's seat
        if head.host_rank is None:
            if engine_pg is None:
                raise ValueError("disaggregated engines need the engines' placement group (reserve_engines)")
            # engine bundles come first in `plan.bundles`: the layout index is also the index in the engines' group
            out.append(actor_options(engine_pg, head))
        else:
            out.append(guest_options([trainer_workers[s.host_rank] for s in seats], plan.uses_gpu))
    return out


def check_guests_after_restart(plan: PlacementPlan, hosts: Sequence[dict], new_workers: Sequence[dict]) -> None:
    """After Ray Train restarted the trainer group, its ranks may sit on other GPUs than before while the colocated
    engines stayed where they were (`hosts`: the first group's pings). Refuse a new rank 0 on an engine's GPU: the
    NCCL weight-sync group would hold two members on one device."""
    if not plan.uses_gpu or plan.placement != "colocated":
        return
    rank0 = (new_workers[0]["node_id"], tuple(new_workers[0]["gpu_ids"]))
    for e, seats in enumerate(plan.engine_slots):
        for seat in seats:
            host = hosts[seat.host_rank]
            if (host["node_id"], tuple(host["gpu_ids"])) == rank0:
                raise PlacementInfeasibleError(
                    f"after the trainer group restarted, trainer rank 0 sits on GPU {rank0[1]} of node {rank0[0]}, "
                    f"where engine {e} runs: one NCCL weight-sync group cannot hold both (restart the run)")


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


def _known(resources: dict[str, float]) -> dict[str, float]:
    # Leave out Ray's internal per-node and memory entries: they make the message unreadable.
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not (k.startswith("node:") or "memory" in k)}
