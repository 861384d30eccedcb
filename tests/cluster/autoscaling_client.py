"""The client half of tests/cluster/test_autoscaling_layout.py, run in its own process.

Ray keeps the auth mode of the first `ray.init` process-wide, and the private autoscaling head runs with
RAY_AUTH_MODE=disabled; in a subprocess that setting cannot leak into the pytest process's later local clusters.
Prints one JSON line with what it measured; any failed check exits non-zero with the reason.
"""

from __future__ import annotations

import json
import sys
import time

import ray

from ngrpo_ray.config.load import load_config
from ngrpo_ray.distributed import cluster_capacity, placement, reservation


def _gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0)


def _wait_for(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s} s")
        time.sleep(0.5)
    return time.monotonic() - start


def main(gcs_address: str) -> dict:
    ray.init(address=gcs_address, log_to_driver=False)
    out: dict = {"gpu_nodes_at_start": _gpu_nodes(), "gpus_at_start": ray.cluster_resources().get("GPU", 0)}
    capacity, source = cluster_capacity.cluster_capacity()
    out.update(capacity_gpus=capacity["GPU"], capacity_source=source)

    too_big = load_config("r1_distill_1p5b_ngrpo", ["trainer.num_workers=24", "trainer.prompts_per_iteration=96"])
    try:
        reservation.reserve_layout(too_big, name="too-big")
        out["too_big_error"] = None
    except placement.PlacementInfeasibleError as err:
        out["too_big_error"] = str(err)

    cfg = load_config("r1_distill_1p5b_ngrpo", ["cluster.placement_timeout_s=120"])
    start = time.monotonic()
    pg, plan = reservation.reserve_layout(cfg, name="paper")  # waits while the autoscaler adds a node
    out.update(scale_up_s=time.monotonic() - start, plan_gpus=plan.gpus, gpu_nodes_after_reserve=_gpu_nodes(),
               nodes_holding_layout=len(set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())))
    ray.util.remove_placement_group(pg)
    out["scale_down_s"] = _wait_for(lambda: _gpu_nodes() == 0, timeout_s=90)
    ray.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
