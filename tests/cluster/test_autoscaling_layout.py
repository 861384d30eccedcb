"""Autoscaling, shown: a paper preset's layout on Ray's local autoscaling cluster (the fake multi-node provider that
`ray.cluster_utils.AutoscalingCluster` drives): a CPU-only head and one GPU node type (8 logical GPUs, min 0, max 2).

The plan reads the autoscaler's maximum (2 x 8 GPUs) as what the cluster can have; reserving the 8-GPU colocated
layout makes the autoscaler add one GPU node; releasing it lets the node go after the idle timeout; a 24-GPU layout
fails at once with both numbers.

Not `AutoscalingCluster` itself: its start and shutdown run `ray stop --force` (every Ray process on the machine, other
users' included), and Ray 2.60's wheel lacks the example.yaml it reads. The head here is private (own ports, temp
dir) and stopped by its own processes only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from ngrpo_ray.config.load import load_config
from ngrpo_ray.distributed import cluster_capacity, placement, reservation
from tests.support.local_head import free_port, stop_head

# Opt-in for now: it sets RAY_AUTH_MODE=disabled for its private head, and Ray keeps the auth mode process-wide, so a
# local `ray.init()` later in the same pytest process fails ("Authentication token is missing"). Run it alone:
#   NGRPO_AUTOSCALING_TEST=1 pytest tests/cluster/test_autoscaling_layout.py   (about 25 s here)
# Moving its client into a subprocess would let it join the suite.
pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(os.environ.get("NGRPO_AUTOSCALING_TEST") != "1",
                                 reason="opt-in (NGRPO_AUTOSCALING_TEST=1): changes Ray's process-wide auth mode")]

VENV_BIN = Path(sys.executable).parent
IDLE_TIMEOUT_MIN = 0.05  # 3 s: the GPU node goes soon after the layout releases it


def _autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "ngrpo_fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN, "head_node_type": "ray.head.default",
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "gpu_node": {"resources": {"CPU": 16, "GPU": 8}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def autoscaling_head(monkeypatch):
    temp_dir = tempfile.mkdtemp(prefix="ngrpo_as_", dir="/tmp")
    port = free_port()
    gcs = f"127.0.0.1:{port}"
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(_autoscaling_config(gcs)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--autoscaling-config={config}", "--num-cpus=2",
           "--num-gpus=0", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        ray.init(address=gcs, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0)


def _wait_for(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - start


def test_paper_layout_scales_a_gpu_node_up_and_down(autoscaling_head):
    t0 = time.monotonic()
    assert _gpu_nodes() == 0 and "GPU" not in ray.cluster_resources()
    capacity, source = cluster_capacity.cluster_capacity()
    assert capacity["GPU"] == 16 and source == "autoscaler maximum"

    too_big = load_config("r1_distill_1p5b_ngrpo", ["trainer.num_workers=24", "trainer.prompts_per_iteration=96"])
    with pytest.raises(placement.PlacementInfeasibleError) as info:
        reservation.reserve_layout(too_big, name="too-big")
    assert "it asks for 24 GPUs, the cluster can have at most 16 GPUs (autoscaler maximum)" in str(info.value)

    cfg = load_config("r1_distill_1p5b_ngrpo", ["cluster.placement_timeout_s=120"])
    start = time.monotonic()
    pg, plan = reservation.reserve_layout(cfg, name="paper")  # waits while the autoscaler adds a node
    scale_up_s = time.monotonic() - start
    assert plan.gpus == 8 and _gpu_nodes() == 1  # PACK: the whole layout on one 8-GPU node
    nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())
    assert len(nodes) == 1

    ray.util.remove_placement_group(pg)
    scale_down_s = _wait_for(lambda: _gpu_nodes() == 0, timeout_s=90)
    print(f"autoscaling: up {scale_up_s:.1f} s, down {scale_down_s:.1f} s after release, "
          f"test body {time.monotonic() - t0:.1f} s")
