"""The cluster files: the autoscaler YAML against Ray's own schema, the KubeRay manifests against what a run needs."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from ngrpo_ray.config.load import load_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
PRESETS = ("r1_distill_1p5b_ngrpo", "r1_distill_7b_ngrpo")


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())


def _kuberay(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# --- Ray cluster launcher YAML ---------------------------------------------------------------------------------

def test_launcher_yaml_validates_against_rays_schema_as_written_and_as_ray_up_prepares_it():
    raw = _launcher()
    validate_config(copy.deepcopy(raw))  # Ray's own validator (jsonschema + node-type checks)
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(copy.deepcopy(raw)))  # merged with Ray's AWS defaults, as `ray up` does


def test_schema_check_is_not_vacuous():
    broken = _launcher()
    broken["available_node_types"]["ray.worker.gpu_8x_h100"]["min_wokers"] = 0  # a typo must be caught
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


def test_launcher_has_cpu_head_and_autoscaling_gpu_workers():
    cfg = _launcher()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 1
    for t in gpu_types.values():
        assert t["min_workers"] == 0 and 0 < t["max_workers"] <= cfg["max_workers"]
    # The 1.5B/7B presets ask for 8 GPUs in one placement group: one node type must be able to hold them all.
    for preset in PRESETS:
        wanted = load_config(preset).trainer.num_workers
        assert max(t["resources"]["GPU"] for t in gpu_types.values()) >= wanted


def test_launcher_installs_the_pinned_set():
    cfg = _launcher()
    head = " ".join(cfg["head_setup_commands"])
    workers = " ".join(cfg["worker_setup_commands"])
    assert "-c requirements/cpu.lock" in head and ".[cpu]" in head
    assert "-c requirements/cpu.lock" in workers and ".[gpu]" in workers
    pyproject = (CLUSTER.parent / "pyproject.toml").read_text()
    assert 'gpu = ["vllm==0.32.0"]' in pyproject  # what `.[gpu]` installs
    assert "2.60.0" in cfg["docker"]["image"] and "py311" in cfg["docker"]["image"]


def test_launcher_keeps_dashboard_on_loopback_and_token_auth_on():
    cfg = _launcher()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in yaml.safe_dump(cfg)
    for command in (head_start, " ".join(cfg["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in command
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # token from the user's machine
    assert "RAY_AUTH_TOKEN=" not in (CLUSTER / "ray-cluster-aws.yaml").read_text()  # never inline


# --- KubeRay ---------------------------------------------------------------------------------------------------

def _cluster_specs() -> list[tuple[str, dict]]:
    (cluster,) = _kuberay("kuberay-raycluster.yaml")
    (job,) = _kuberay("kuberay-rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    return [("raycluster", cluster["spec"]), ("rayjob", job["spec"]["rayClusterSpec"])]


@pytest.mark.parametrize("which", [0, 1])
def test_kuberay_autoscaling_gpu_groups(which):
    _, spec = _cluster_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    assert max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in gpu_groups) >= 8  # the paper presets' 8 GPUs fit one pod


@pytest.mark.parametrize("which", [0, 1])
def test_kuberay_token_from_secret_and_no_public_exposure(which):
    _, spec = _cluster_specs()[which]
    assert spec["authOptions"] == {"mode": "token", "secretName": "ngrpo-ray-auth"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":
        assert head.get("serviceType") == "ClusterIP"  # reachable inside the cluster only, and token-protected
    else:
        assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_kuberay_files_hold_no_public_service_ingress_or_credentials():
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        docs = _kuberay(name)
        text = (CLUSTER / name).read_text()
        assert not [d for d in docs if d["kind"] in ("Ingress", "Secret", "Gateway", "HTTPRoute")]
        for node in _walk(docs):
            if isinstance(node, dict):
                assert node.get("type") not in ("LoadBalancer", "NodePort")
                assert node.get("serviceType") not in ("LoadBalancer", "NodePort")
                assert "stringData" not in node and "hostNetwork" not in node
        assert not re.search(r"RAY_AUTH_TOKEN\s*[:=]\s*\S", text)


def test_rayjob_entrypoint_runs_the_training_workflow_on_a_real_preset():
    (job,) = _kuberay("kuberay-rayjob.yaml")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "workflows/train.py", "--config", "r1_distill_1p5b_ngrpo"]
    assert load_config(entry[3]).cluster.placement == "colocated"  # the preset exists and loads
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": "/home/ray/ngrpo_ray"}
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_readme_shows_the_commands_for_both_presets():
    readme = (CLUSTER / "README.md").read_text()
    for command in ("ray up", "ray job submit", "kubectl apply", "ray get-auth-token", "kubectl create secret"):
        assert command in readme
    for preset in PRESETS:
        assert f"--config {preset}" in readme
