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

from tests.support.local_head import free_port, stop_head

# The Ray client runs in a subprocess (tests/cluster/autoscaling_client.py): Ray keeps the auth mode of the first
# `ray.init` process-wide, and this private head runs with RAY_AUTH_MODE=disabled.
pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
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
def autoscaling_head():
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
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield gcs, env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_paper_layout_scales_a_gpu_node_up_and_down(autoscaling_head):
    gcs, env = autoscaling_head
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tests.cluster.autoscaling_client", gcs], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"client failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["gpu_nodes_at_start"] == 0 and got["gpus_at_start"] == 0
    assert got["capacity_gpus"] == 16 and got["capacity_source"] == "autoscaler maximum"
    assert "it asks for 24 GPUs, the cluster can have at most 16 GPUs (autoscaler maximum)" in got["too_big_error"]
    assert got["plan_gpus"] == 8 and got["gpu_nodes_after_reserve"] == 1  # the autoscaler added one 8-GPU node
    assert got["nodes_holding_layout"] == 1  # PACK: the whole layout on that node
    assert got["scale_down_s"] < 90  # removed after release and the idle timeout
    print(f"autoscaling: up {got['scale_up_s']:.1f} s, down {got['scale_down_s']:.1f} s after release, "
          f"client {time.monotonic() - start:.1f} s")
