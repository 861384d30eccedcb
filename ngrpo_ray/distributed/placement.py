"""Where engines and trainers run: one plan from the config for both layouts, its reservation, and `init_ray`.

The plan (`plan_placement`) decides every seat; the driver prints it at start and logs it to MLflow.

- "colocated": one bundle per trainer GPU, `{"CPU": trainer_cpus + engine_cpus, "GPU": 1}`. Trainer rank i owns bundle
  i. Engine ranks (num_engines x tensor_parallel_size, at most trainer.num_workers) ride as guests on the LAST trainer
  ranks' GPUs: they claim no Ray resources of their own (their share is inside the host rank's bundle), are pinned to
  the host's node, and see only the host's GPU (CUDA_VISIBLE_DEVICES). Engines sleep (vLLM sleep mode, level 1)
  during the update. Filling GPUs from the last one keeps trainer rank 0's GPU engine-free until every GPU hosts one.
- "disaggregated": engine bundles `{"CPU": engine_cpus, "GPU": 1}` (one per TP rank) in a placement group of their
  own, and trainer bundles `{"CPU": trainer_cpus, "GPU": 1}`; any split the user sets.

Why the trainer's bundles are not in our placement group: Ray Train 2.60 (Train V2, the default) always creates its
worker group's placement group itself, `[resources_per_worker] * num_workers` with `ScalingConfig.placement_strategy`
(ray/train/v2/_internal/execution/worker_group/worker_group.py, `_create_placement_group`); a worker group cannot join
an existing one. So the plan hands Ray Train its `resources_per_worker` and strategy, and guests (colocated engines)
are seated next to the trainer ranks after the group starts. `plan.bundles` is the whole layout (what the autoscaler
is asked for, in total); `reserve_layout` reserves it in one group, which the layout tests use to check every seat.

The weight-sync group is trainer rank 0 + every engine rank. One NCCL group may never hold two members on one device:
an engine on rank 0's own GPU must get weights by CUDA IPC (`transport == "ipc"`), which is not built yet, so such a
plan is refused on GPU. On CPU (gloo, no devices) the rule holds trivially and the plan says so.

A layout the cluster can never hold fails at once (`check_capacity`): GPUs and CPUs asked against what the cluster can
have, which is the autoscaler's maximum (node types' max_workers x resources) when Ray knows it, else the current
total. GPUs are requested only when trainer.use_gpu is true, so CPU presets run on CPU-only clusters.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional, Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ngrpo_ray.config.schema import Config

logger = logging.getLogger(__name__)

Bundle = dict[str, float]

# Ray Train's default per worker; there is no config key for it yet (see the cluster README).
DEFAULT_TRAINER_CPUS = 1.0
TIMEOUT_KEY = "cluster.placement_timeout_s"


class PlacementTimeoutError(TimeoutError):
    """The placement group could not be reserved within cluster.placement_timeout_s."""


class PlacementInfeasibleError(RuntimeError):
    """The layout asks for more than the cluster can ever have (autoscaler maximum included)."""


@dataclass(frozen=True)
class Slot:
    """One actor's seat: which bundle of the layout, and what it claims there (guests claim nothing)."""

    bundle_index: int
    num_cpus: float
    num_gpus: float
    host_rank: Optional[int] = None  # colocated engines: the trainer rank whose GPU (and bundle) they share


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
        engine_bundle_list = [_bundle(e_cpus, gpu * cfg.rollout.engine_gpus) for _ in range(ranks)]
        trainer_resources = _bundle(trainer_cpus, gpu)
        bundles = engine_bundle_list + [dict(trainer_resources) for _ in range(workers)]
        roles = [[f"engine {i // tp} tp {i % tp}"] for i in range(ranks)] + [[f"trainer {i}"] for i in range(workers)]
        engine_slots = [[Slot(e * tp + r, e_cpus, gpu * cfg.rollout.engine_gpus) for r in range(tp)]
                        for e in range(n_eng)]
        trainer_slots = [Slot(ranks + i, trainer_resources["CPU"], gpu) for i in range(workers)]
    transports = [_transport(uses_gpu, seats, trainer_slots[0], cfg.cluster.sync_backend) for seats in engine_slots]
    if not uses_gpu:
        notes.append("CPU: the weight-sync group is gloo between processes; no device is shared")
    # PACK: fill as few nodes as possible (fast NCCL inside a node) but spill to more nodes when needed.
    plan = PlacementPlan(cfg.cluster.placement, uses_gpu, bundles, roles, "PACK", trainer_resources,
                         engine_bundle_list, engine_slots, trainer_slots, transports,
                         sleep_engines=uses_gpu and cfg.cluster.placement == "colocated", notes=notes)
    check_sync_devices(plan)
    return plan


def _transport(uses_gpu: bool, seats: list[Slot], rank0: Slot, sync_backend: str = "auto") -> str:
    if not uses_gpu or sync_backend == "gloo":  # gloo goes through host memory: any seat works
        return "gloo"
    return "ipc" if any(s.bundle_index == rank0.bundle_index for s in seats) else "nccl"


def check_sync_devices(plan: PlacementPlan) -> None:
    """The NCCL weight-sync group (trainer rank 0 + engine ranks on nccl) never holds two members on one GPU; an
    engine on rank 0's GPU needs the CUDA IPC transport, which is not built yet."""
    if not plan.uses_gpu:
        return
    members = [("trainer 0", plan.trainer_slots[0].bundle_index)]
    for e, (seats, transport) in enumerate(zip(plan.engine_slots, plan.transports)):
        if transport == "ipc":
            raise PlacementInfeasibleError(
                f"engine {e} shares trainer rank 0's GPU (bundle {seats[0].bundle_index}): it must receive weights "
                "by CUDA IPC, which this build does not have yet. Use fewer engine ranks than trainer GPUs "
                "(rollout.num_engines x rollout.tensor_parallel_size < trainer.num_workers) or "
                "cluster.placement=disaggregated")
        if transport == "nccl":
            members += [(f"engine {e} tp {r}", s.bundle_index) for r, s in enumerate(seats)]
    seen: dict[int, str] = {}
    for who, device in members:
        if device in seen:
            raise AssertionError(f"placement plan puts {seen[device]} and {who} of the NCCL weight-sync group on "
                                 f"one GPU (bundle {device})")
        seen[device] = who


# ------------------------------------------------------------------------------------------------ capacity (fast)


def cluster_capacity() -> tuple[dict[str, float], str]:
    """What the cluster can ever have: the autoscaler's maximum (node types' max workers x resources) where it is larger
    than what is there now, else the current total.

    The maximum comes from the cluster config Ray keeps in its GCS (what Ray Train reads; reported by KubeRay's
    autoscaler), else from the autoscaling config the head's monitor runs with (`ray up` / `ray start
    --autoscaling-config`), readable where the driver runs on the head, as `ray job submit` drivers do."""
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    most = _max_from_gcs_config() or _max_from_autoscaling_file() or {}
    merged = dict(now)
    for key, value in most.items():
        merged[key] = max(merged.get(key, 0.0), float(value))
    source = "autoscaler maximum" if any(float(v) > now.get(k, 0.0) for k, v in most.items()) else "current total"
    return merged, source


def _max_from_gcs_config() -> dict[str, float]:
    try:
        from ray._private.state import state

        return {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:  # noqa: BLE001 - no config on a plain local cluster, or an API change: fall back
        return {}


_AUTOSCALING_CONFIGS: dict[str, Optional[dict]] = {}  # per cluster (GCS address): it is fixed when the head starts


def _autoscaling_config() -> Optional[dict]:
    """The autoscaling config of this cluster's monitor (a process on the head), or ~/ray_bootstrap_config.yaml."""
    try:
        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001
        gcs = ""
    if gcs not in _AUTOSCALING_CONFIGS:
        _AUTOSCALING_CONFIGS[gcs] = _read_autoscaling_config(gcs)
    return _AUTOSCALING_CONFIGS[gcs]


def _read_autoscaling_config(gcs: str) -> Optional[dict]:
    import yaml

    path = None
    try:
        import psutil

        port = ":" + gcs.rsplit(":", 1)[-1]  # the monitor may name the GCS by another of the head's addresses
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if any("monitor.py" in c for c in cmd) and any(c.endswith(port) for c in cmd):
                path = next((c.split("=", 1)[1] for c in cmd if c.startswith("--autoscaling-config=")), None)
                break
    except Exception:  # noqa: BLE001 - not on the head, or no permission: try the launcher's file
        path = None
    path = path or os.path.expanduser("~/ray_bootstrap_config.yaml")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None


def _max_from_autoscaling_file() -> dict[str, float]:
    config = _autoscaling_config()
    if not config:
        return {}
    total: dict[str, float] = {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        count = 1 if name == config.get("head_node_type") else int(node_type.get("max_workers", 0))
        for key, value in (node_type.get("resources") or {}).items():
            total[key] = total.get(key, 0.0) + count * float(value)
    return total


def check_capacity(plan: PlacementPlan) -> None:
    """Raise PlacementInfeasibleError at once when the layout can never be placed: GPUs (and CPUs) asked against the
    most the cluster can have, and bundles no node can hold."""
    capacity, source = cluster_capacity()
    problems = []
    for key, asked in (("GPU", plan.gpus), ("CPU", plan.cpus)):
        have = capacity.get(key, 0.0)
        if asked > have:
            problems.append(f"it asks for {asked:g} {key}s, the cluster can have at most {have:g} {key}s ({source})")
    shapes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] + _node_type_shapes()
    homeless = sorted({_fmt(b) for b in plan.bundles if not any(_fits(b, s) for s in shapes)})
    if homeless:
        problems.append("no node (nor autoscaling node type) can hold a bundle " + ", ".join(homeless))
    if problems:
        raise PlacementInfeasibleError(
            f"the {plan.placement} layout cannot be placed on this cluster: " + "; ".join(problems) + ".\n"
            + plan.describe() + "\nLower trainer.num_workers / rollout.num_engines, change cluster.placement, or add "
            "GPU nodes (an autoscaling node type's max_workers).")


def _node_type_shapes() -> list[dict[str, float]]:
    """Resources of each autoscaling node type that may start (GCS config, else the autoscaling file)."""
    shapes: list[dict[str, float]] = []
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None:
            shapes = [{k: float(v) for k, v in group.resources.items()} for group in config.node_group_configs
                      if group.max_count != 0]
    except Exception:  # noqa: BLE001
        shapes = []
    if not shapes:
        file_config = _autoscaling_config() or {}
        shapes = [{k: float(v) for k, v in (t.get("resources") or {}).items()}
                  for t in (file_config.get("available_node_types") or {}).values() if t.get("max_workers", 0)]
    return shapes


# --------------------------------------------------------------------------------------------- reservations


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


def guest_options(host: dict, uses_gpu: bool) -> dict[str, Any]:
    """Options seating a colocated engine next to its host trainer rank (`host`: the rank's ping: node_id, gpu_ids).

    The guest claims nothing (its share is in the host's bundle), is pinned to the host's node, and sees only the
    host's GPUs. Not in the host's placement group on purpose: Ray Train removes that group when it restarts the
    worker group, which would kill the engine too."""
    options: dict[str, Any] = {
        "num_cpus": 0, "num_gpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=host["node_id"], soft=False),
    }
    if uses_gpu:
        # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for actors with num_gpus=0 (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO)
        options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, host["gpu_ids"]))}}
    return options


def engine_actor_options(plan: PlacementPlan, engine_pg: Optional[PlacementGroup],
                         trainer_workers: Sequence[dict]) -> list[dict[str, Any]]:
    """Per engine, its `options(...)`: a bundle of the engines' group, or a guest seat on its host trainer rank."""
    out = []
    for seats in plan.engine_slots:
        head = seats[0]  # the engine actor sits with its tensor-parallel rank 0 (TP > 1 is refused for now)
        if head.host_rank is None:
            if engine_pg is None:
                raise ValueError("disaggregated engines need the engines' placement group (reserve_engines)")
            # engine bundles come first in `plan.bundles`: the layout index is also the index in the engines' group
            out.append(actor_options(engine_pg, head))
        else:
            out.append(guest_options(trainer_workers[head.host_rank], plan.uses_gpu))
    return out


def check_guests_after_restart(plan: PlacementPlan, hosts: Sequence[dict], new_workers: Sequence[dict]) -> None:
    """After Ray Train restarted the trainer group, its ranks may sit on other GPUs than before while the colocated
    engines stayed where they were (`hosts`: the first group's pings). Refuse a new rank 0 on an engine's GPU: the
    NCCL weight-sync group would hold two members on one device."""
    if not plan.uses_gpu or plan.placement != "colocated":
        return
    rank0 = (new_workers[0]["node_id"], tuple(new_workers[0]["gpu_ids"]))
    for e, seats in enumerate(plan.engine_slots):
        host = hosts[seats[0].host_rank]
        if (host["node_id"], tuple(host["gpu_ids"])) == rank0:
            raise PlacementInfeasibleError(
                f"after the trainer group restarted, trainer rank 0 sits on GPU {rank0[1]} of node {rank0[0]}, where "
                f"engine {e} runs: one NCCL weight-sync group cannot hold both (restart the run)")


def write_plan(plan: PlacementPlan, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)


def plan_params(plan: PlacementPlan) -> dict[str, Any]:
    """A few MLflow params; the full plan goes in as the placement_plan.json artifact."""
    return {"plan.layout": plan.placement, "plan.gpus": plan.gpus, "plan.cpus": plan.cpus,
            "plan.bundles": len(plan.bundles), "plan.transports": ",".join(plan.transports),
            "plan.sleep_engines": plan.sleep_engines}


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
