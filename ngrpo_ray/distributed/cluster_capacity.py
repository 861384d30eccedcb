"""What the cluster can ever hold, checked in seconds before anything is reserved: a layout larger than the
autoscaler's maximum (or the current total) fails at once with both numbers (`check_capacity`)."""

from __future__ import annotations

import os
from typing import Optional

import ray

from ngrpo_ray.distributed.placement import Bundle, PlacementInfeasibleError, PlacementPlan, _fmt


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


def check_capacity(plan: PlacementPlan, extra_cpus: dict[str, float] | None = None) -> None:
    """Raise PlacementInfeasibleError at once when the layout can never be placed: GPUs (and CPUs) asked against the
    most the cluster can have, and bundles no node can hold. ``extra_cpus``: actors outside the plan that the run
    also needs ({"the reward scorer": 0.1}); without them counted, a layout that fills every CPU leaves such an actor
    waiting for ever."""
    capacity, source = cluster_capacity()
    problems = []
    extra = sum((extra_cpus or {}).values())
    for key, asked in (("GPU", plan.gpus), ("CPU", plan.cpus + extra)):
        have = capacity.get(key, 0.0)
        if asked > have:
            parts = "" if key == "GPU" or not extra else " (the layout's " + f"{plan.cpus:g}" + "".join(
                f" + {who}'s {n:g}" for who, n in extra_cpus.items()) + ")"
            problems.append(f"it asks for {asked:g} {key}s{parts}, the cluster can have at most {have:g} {key}s "
                            f"({source})")
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


def _fits(bundle: Bundle, node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items())
