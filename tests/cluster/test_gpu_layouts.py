"""Every GPU preset's layout reserved on a local Ray cluster with 8 logical GPUs (one 8-GPU node), seats checked.

Ray's logical GPUs need no CUDA: a bundle {"GPU": 1} reserves one GPU id, and a task seated in it sees that id. Tasks
(not actors) keep this light: Ray reuses their worker processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import ray

from ngrpo_ray.config.load import PRESET_DIR, load_config
from ngrpo_ray.distributed import placement, reservation

PATTERNS = ("*_1p5b*", "*_7b*", "llama32_*", "qwen3_*", "r1_*")
GPU_PRESETS = sorted({p.stem for pattern in PATTERNS for p in Path(PRESET_DIR).glob(f"{pattern}.yaml")})
# The disaggregated split of the same node: 6 trainer GPUs + 2 engine GPUs (the batch divides by 6 x mini_batches).
DISAGGREGATED = ("cluster.placement=disaggregated", "trainer.num_workers=6", "rollout.num_engines=2",
                 "trainer.prompts_per_iteration=48")


@pytest.fixture(scope="module")
def eight_gpu_node():
    ray.init(num_cpus=16, num_gpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote
def _where() -> dict:
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "pg": ctx.get_placement_group_id()}


def _seat(plan: placement.PlacementPlan, pg) -> tuple[list[dict], list[dict]]:
    """Run a task in every trainer seat, then in every engine seat (guests next to their host rank)."""
    trainers = ray.get([_where.options(**reservation.actor_options(pg, s)).remote() for s in plan.trainer_slots],
                       timeout=60)
    if plan.placement == "colocated":
        options = reservation.engine_actor_options(plan, None, trainers)
    else:
        options = reservation.engine_actor_options(plan, pg, trainers)  # the layout's group starts with the engines
    engines = ray.get([_where.options(**o).remote() for o in options], timeout=60)
    return trainers, engines


def test_gpu_presets_are_found():
    assert "r1_distill_1p5b_ngrpo" in GPU_PRESETS and "r1_distill_7b_ngrpo" in GPU_PRESETS
    assert "llama32_1b_ngrpo" in GPU_PRESETS and "qwen3_1p7b_base_grpo" in GPU_PRESETS
    assert len(GPU_PRESETS) >= 20


def _layouts() -> list:
    return [load_config(name, list(overrides) + ["cluster.placement_timeout_s=30"])
            for name in GPU_PRESETS for overrides in ((), DISAGGREGATED)]


@pytest.mark.ray
def test_every_gpu_preset_layout_is_reserved_on_one_8_gpu_node(eight_gpu_node):
    start = time.monotonic()
    for cfg in _layouts():
        pg, plan = reservation.reserve_layout(cfg, name="layout")
        ray.util.remove_placement_group(pg)
        assert plan.gpus == 8.0 and plan.placement in ("colocated", "disaggregated")
    elapsed = time.monotonic() - start
    assert elapsed < 60.0, elapsed


@pytest.mark.ray
def test_every_role_gets_its_bundle_in_both_layouts(eight_gpu_node):
    start = time.monotonic()
    distinct = {}
    for cfg in _layouts():  # all GPU presets share two node shapes: 8 shared GPUs, or 6 trainer + 2 engine GPUs
        plan = placement.plan_placement(cfg)
        distinct.setdefault((plan.placement, str(plan.bundles), str(plan.roles)), cfg)
    assert sorted(key[0] for key in distinct) == ["colocated", "disaggregated"]
    for cfg in distinct.values():
        pg, plan = reservation.reserve_layout(cfg, name="seats")
        try:
            trainers, engines = _seat(plan, pg)
            trainer_gpus = [t["gpu_ids"] for t in trainers]
            assert all(len(g) == 1 for g in trainer_gpus)
            assert len({g[0] for g in trainer_gpus}) == len(trainers)  # one trainer rank per GPU
            if plan.placement == "colocated":
                # engine e shares trainer rank e's GPU and node (its weights come by CUDA IPC from that rank)
                assert len(trainers) == 8 and len(engines) == 8
                for e, engine in enumerate(engines):
                    assert plan.roles[e] == [f"trainer {e}", f"engine {e} tp 0"]
                    assert engine["visible"] == trainer_gpus[e][0]
                    assert engine["node_id"] == trainers[e]["node_id"]
                    assert engine["gpu_ids"] == []  # claims nothing: its share is in the host's bundle
            else:
                assert plan.roles[:2] == [["engine 0 tp 0"], ["engine 1 tp 0"]] and len(trainers) == 6
                assert all(e["pg"] == pg.id.hex() for e in engines)
                assert len({e["gpu_ids"][0] for e in engines} | {g[0] for g in trainer_gpus}) == 8  # all apart
            if plan.transports[0] == "nccl":  # the NCCL weight-sync group (trainer rank 0 + engines): distinct devices
                sync_devices = [trainer_gpus[0][0]] + [e["gpu_ids"][0] for e in engines]
                assert len(set(sync_devices)) == len(sync_devices)
            else:  # CUDA IPC: each engine reads the copy its own GPU's trainer rank exposes
                assert plan.transports == ["ipc"] * len(engines) and plan.placement == "colocated"
        finally:
            ray.util.remove_placement_group(pg)
    assert time.monotonic() - start < 60.0


@pytest.mark.ray
@pytest.mark.parametrize("overrides", [
    ("rollout.num_engines=3",),  # colocated: 3 engines x TP 2 on trainer GPUs 2..7
    ("cluster.placement=disaggregated", "trainer.num_workers=6", "rollout.num_engines=1",
     "trainer.prompts_per_iteration=48"),  # 6 trainer GPUs + one engine bundle of 2 GPUs
])
def test_a_split_engine_sees_one_gpu_per_rank_on_one_node(eight_gpu_node, overrides):
    cfg = load_config("r1_distill_7b_ngrpo", ["rollout.tensor_parallel_size=2", *overrides])
    pg, plan = reservation.reserve_layout(cfg, name="tp")
    try:
        trainers, engines = _seat(plan, pg)
        trainer_gpus = [t["gpu_ids"][0] for t in trainers]
        for e, engine in enumerate(engines):
            if plan.placement == "colocated":
                hosts = [s.host_rank for s in plan.engine_slots[e]]
                assert engine["visible"] == ",".join(trainer_gpus[h] for h in hosts)  # rank r sees host r's GPU
                assert {trainers[h]["node_id"] for h in hosts} == {engine["node_id"]}
                assert engine["gpu_ids"] == []
            else:
                assert len(engine["gpu_ids"]) == 2 and engine["pg"] == pg.id.hex()
                assert not set(engine["gpu_ids"]) & set(trainer_gpus)
        seen = [g for e in engines for g in (e["visible"].split(",") if plan.placement == "colocated"
                                             else e["gpu_ids"])]
        assert len(seen) == 6 if plan.placement == "colocated" else 2
        assert trainer_gpus[0] not in seen  # 6 engine ranks on 8 GPUs fill the last ones first
        assert len(set(seen)) == len(seen)
    finally:
        ray.util.remove_placement_group(pg)


@pytest.mark.ray
@pytest.mark.parametrize("overrides,asked", [
    (("trainer.num_workers=16", "trainer.prompts_per_iteration=64"), 16),  # colocated, 16 GPUs
    (("cluster.placement=disaggregated", "rollout.num_engines=1"), 9),  # 8 trainer GPUs + 1 engine GPU
])
def test_layout_larger_than_the_cluster_fails_at_once_with_both_numbers(eight_gpu_node, overrides, asked):
    cfg = load_config("r1_distill_7b_ngrpo", list(overrides))
    start = time.monotonic()
    with pytest.raises(placement.PlacementInfeasibleError) as info:
        reservation.reserve_layout(cfg, name="too-big")
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert f"it asks for {asked} GPUs, the cluster can have at most 8 GPUs (current total)" in message
    assert not [t for t in ray.util.placement_group_table().values() if t["name"] == "too-big"]


@pytest.mark.ray
def test_driver_refuses_a_layout_the_cluster_can_never_hold_before_loading_anything(eight_gpu_node, tmp_path):
    from ngrpo_ray.distributed.session import Session

    cfg = load_config("r1_distill_7b_ngrpo", ["cluster.placement=disaggregated", "rollout.num_engines=1",
                                              f"trainer.output_dir={tmp_path}"])
    printed: list[str] = []
    start = time.monotonic()
    with pytest.raises(placement.PlacementInfeasibleError,
                       match="it asks for 9 GPUs, the cluster can have at most 8 GPUs"):
        Session(cfg, log=printed.append)
    assert time.monotonic() - start < 10.0  # not after cluster.placement_timeout_s or a command timeout
    assert printed[0].startswith("placement plan: disaggregated, 9 bundles, 9 GPUs")  # printed at start
    assert not list(tmp_path.iterdir())  # no data, model or MLflow run was touched
