"""Placement-group bundles from the config, and real reservations on a tiny local Ray cluster (2 CPUs, no GPU)."""

from __future__ import annotations

import time

import pytest
import ray

from ngrpo_ray.config.load import load_config
from ngrpo_ray.distributed import placement, ray_init, reservation
from ngrpo_ray.distributed.placement import Slot
from ngrpo_ray.distributed.reservation import PlacementTimeoutError


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


GPU_RUN = (
    "trainer.use_gpu=true", "trainer.num_workers=4",
    "rollout.num_engines=2", "rollout.engine_cpus=2", "rollout.engine_gpus=1",
)


def test_disaggregated_bundles_gpu():
    plan = placement.plan_placement(_cfg("cluster.placement=disaggregated", *GPU_RUN))
    assert plan.bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert plan.engine_bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2  # the engines' own group
    assert plan.trainer_resources == {"CPU": 1.0, "GPU": 1.0}  # Ray Train builds the trainer's group from this
    assert plan.strategy == "PACK"
    assert plan.engine_slots == [[Slot(0, 2.0, 1.0)], [Slot(1, 2.0, 1.0)]]
    assert plan.trainer_slots == [Slot(2, 1.0, 1.0), Slot(3, 1.0, 1.0), Slot(4, 1.0, 1.0), Slot(5, 1.0, 1.0)]
    assert plan.transports == ["nccl", "nccl"] and not plan.sleep_engines
    assert plan.roles[0] == ["engine 0 tp 0"] and plan.roles[5] == ["trainer 3"]


def test_a_split_engine_gets_one_bundle_of_its_gpus_or_one_host_per_rank():
    # disaggregated: one bundle per engine with TP GPUs (a bundle never spans nodes); the actor claims all of it and
    # its executor's other ranks claim nothing of their own
    plan = placement.plan_placement(_cfg("cluster.placement=disaggregated", "trainer.use_gpu=true",
                                         "trainer.num_workers=1", "rollout.num_engines=2", "rollout.engine_cpus=0.5",
                                         "rollout.tensor_parallel_size=2"), trainer_cpus=3.0)
    assert plan.bundles == [{"CPU": 1.0, "GPU": 2.0}] * 2 + [{"CPU": 3.0, "GPU": 1.0}]
    assert plan.engine_slots == [[Slot(0, 1.0, 2.0), Slot(0, 0.0, 0.0, gpu_index=1)],
                                 [Slot(1, 1.0, 2.0), Slot(1, 0.0, 0.0, gpu_index=1)]]
    assert plan.trainer_slots == [Slot(2, 3.0, 1.0)]
    assert plan.roles[0] == ["engine 0 tp 0", "engine 0 tp 1"] and plan.gpus == 5.0
    assert plan.transports == ["nccl", "nccl"]  # 5 members of the sync group on 5 distinct (bundle, GPU) seats
    # colocated: each rank rides on its own trainer GPU, engines on the last ones
    plan = placement.plan_placement(_cfg("cluster.placement=colocated", "trainer.use_gpu=true",
                                         "trainer.num_workers=8", "rollout.num_engines=2",
                                         "rollout.tensor_parallel_size=2"))
    assert [[s.host_rank for s in seats] for seats in plan.engine_slots] == [[4, 5], [6, 7]]
    assert plan.gpus == 8.0 and plan.roles[5] == ["trainer 5", "engine 0 tp 1"]


def test_a_colocated_split_engine_sees_its_hosts_gpus_on_one_node():
    hosts = [{"node_id": "a" * 56, "gpu_ids": [6]}, {"node_id": "a" * 56, "gpu_ids": [7]}]
    options = reservation.guest_options(hosts, uses_gpu=True)
    assert options["runtime_env"] == {"env_vars": {"CUDA_VISIBLE_DEVICES": "6,7"}}  # worker r gets rank r's GPU
    assert options["num_gpus"] == 0 and options["num_cpus"] == 0
    with pytest.raises(placement.PlacementInfeasibleError, match="ranks ride on trainer ranks of 2 nodes"):
        reservation.guest_options([hosts[0], {"node_id": "b" * 56, "gpu_ids": [0]}], uses_gpu=True)


def test_colocated_engines_are_guests_on_the_last_trainer_gpus():
    plan = placement.plan_placement(_cfg("cluster.placement=colocated", *GPU_RUN))
    # 4 shared GPUs, each bundle room for a trainer (1 CPU) and an engine (2 CPUs); Ray Train claims whole bundles.
    assert plan.bundles == [{"CPU": 3.0, "GPU": 1.0}] * 4
    assert plan.trainer_resources == {"CPU": 3.0, "GPU": 1.0}
    assert plan.engine_bundles == []  # no group of their own
    assert plan.trainer_slots == [Slot(i, 3.0, 1.0) for i in range(4)]
    assert plan.engine_slots == [[Slot(2, 0.0, 0.0, host_rank=2)], [Slot(3, 0.0, 0.0, host_rank=3)]]
    assert plan.roles == [["trainer 0"], ["trainer 1"], ["trainer 2", "engine 0 tp 0"], ["trainer 3", "engine 1 tp 0"]]
    assert plan.transports == ["ipc", "ipc"]  # each engine reads its own GPU's trainer rank's copy
    assert plan.sleep_engines
    assert "bundle 2 {CPU: 3, GPU: 1}: trainer 2, engine 0 tp 0" in plan.describe()


def test_colocated_engines_on_every_gpu_get_ipc_and_nccl_there_is_refused():
    plan = placement.plan_placement(_cfg("cluster.placement=colocated", "trainer.use_gpu=true", "trainer.num_workers=2",
                                         "rollout.num_engines=2"))
    assert plan.roles == [["trainer 0", "engine 0 tp 0"], ["trainer 1", "engine 1 tp 0"]]
    assert plan.transports == ["ipc", "ipc"]
    # NCCL by name: engine 0 would be a second member of the sync group on trainer rank 0's GPU
    with pytest.raises(placement.PlacementInfeasibleError, match="one NCCL group may not hold two members"):
        placement.plan_placement(_cfg("cluster.placement=colocated", "trainer.use_gpu=true", "trainer.num_workers=2",
                                      "rollout.num_engines=2", "cluster.sync_backend=nccl"))
    assert placement.plan_placement(_cfg("cluster.placement=colocated", "trainer.use_gpu=true", "trainer.num_workers=2",
                                         "rollout.num_engines=1", "cluster.sync_backend=nccl")).transports == ["nccl"]
    # On CPU there is no device to share: the gloo group is fine, and the plan says why.
    plan = placement.plan_placement(_cfg("cluster.placement=colocated", "trainer.num_workers=2",
                                         "rollout.num_engines=2", "rollout.engine_cpus=0.5"))
    assert plan.transports == ["gloo", "gloo"] and plan.bundles == [{"CPU": 1.5}] * 2
    assert any("sleep mode needs CUDA" in n for n in plan.notes)


def test_config_refuses_what_the_plan_cannot_serve():
    from ngrpo_ray.config.load import ConfigError

    # A split engine is accepted on CPU (tests/engine/test_tensor_parallel.py) and GPU runs alike
    assert _cfg("trainer.use_gpu=true", "rollout.tensor_parallel_size=2").rollout.tensor_parallel_size == 2
    with pytest.raises(ConfigError, match="'rollout.tensor_parallel_size' must be >= 1, got 0"):
        _cfg("rollout.tensor_parallel_size=0")
    with pytest.raises(ConfigError, match="rollout.engine_gpus"):
        _cfg("trainer.use_gpu=true", "rollout.engine_gpus=0.5")
    with pytest.raises(ConfigError, match="rollout.num_engines"):
        _cfg("cluster.placement=colocated", "trainer.use_gpu=true", "trainer.num_workers=1", "rollout.num_engines=3")


def test_cpu_run_asks_for_no_gpu_whatever_engine_gpus_says():
    cfg = _cfg("rollout.engine_gpus=1", "rollout.engine_cpus=0.5", "trainer.num_workers=2")  # use_gpu false
    plan = placement.plan_placement(cfg)
    assert plan.bundles == [{"CPU": 0.5}, {"CPU": 1.0}, {"CPU": 1.0}] and plan.gpus == 0
    assert plan.transports == ["gloo"]


def test_cpu_default_plan_is_one_engine_bundle_and_one_trainer_worker():
    plan = placement.plan_placement(load_config("cpu_default"))
    assert plan.placement == "disaggregated"
    assert plan.engine_bundles == [{"CPU": 1.0}] and plan.trainer_resources == {"CPU": 1.0}


def test_paper_presets_plan_eight_shared_gpus():
    # The 1.5B/7B presets (colocated, 8 trainer workers, 8 engines) ask for 8 GPUs in all, not 8 + engines.
    for name in ("r1_distill_1p5b_ngrpo", "r1_distill_7b_ngrpo"):
        plan = placement.plan_placement(load_config(name))
        assert plan.placement == "colocated"
        assert plan.gpus == 8.0 and len(plan.bundles) == 8
        assert plan.roles == [[f"trainer {i}", f"engine {i} tp 0"] for i in range(8)]  # every GPU hosts an engine
        assert plan.transports == ["ipc"] * 8


@pytest.fixture(scope="module")
def local_ray():
    cfg = _cfg("cluster.num_cpus=2")
    ray_init.init_ray(cfg, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_init_ray_starts_local_cluster_with_configured_cpus(local_ray):
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 2.0
    assert "GPU" not in ray.cluster_resources()


@pytest.mark.ray
def test_reserve_and_seat_actors_in_their_bundles(local_ray):
    cfg = _cfg("cluster.placement=disaggregated", "rollout.engine_cpus=0.5", "cluster.placement_timeout_s=20")
    pg, plan = reservation.reserve(cfg)
    try:
        assert plan.bundles == [{"CPU": 0.5}, {"CPU": 1.0}]

        @ray.remote
        class Where:
            def where(self):
                ctx = ray.get_runtime_context()
                return ctx.get_placement_group_id(), ctx.get_assigned_resources()

        seated = [Where.options(**reservation.actor_options(pg, plan.trainer_slots[0])).remote(),
                  Where.options(**reservation.actor_options(pg, plan.engine_slots[0][0])).remote()]
        (pg_a, res_a), (pg_b, res_b) = ray.get([a.where.remote() for a in seated], timeout=60)
        assert pg_a == pg_b == pg.id.hex()
        assert res_a["CPU"] == 1.0 and res_b["CPU"] == 0.5
        for actor in seated:
            ray.kill(actor)
    finally:
        ray.util.remove_placement_group(pg)


@pytest.mark.ray
def test_gpu_layout_on_a_cpu_cluster_fails_at_once_with_both_numbers(local_ray):
    cfg = _cfg("cluster.placement=disaggregated", "trainer.use_gpu=true", "trainer.num_workers=1",
               "rollout.engine_cpus=0.5", "cluster.placement_timeout_s=600")
    start = time.monotonic()
    with pytest.raises(placement.PlacementInfeasibleError) as info:
        reservation.reserve(cfg, name="never")
    assert time.monotonic() - start < 5.0  # not after cluster.placement_timeout_s
    assert "it asks for 2 GPUs, the cluster can have at most 0 GPUs (current total)" in str(info.value)
    assert not [t for t in ray.util.placement_group_table().values() if t["name"] == "never"]  # nothing was asked


@pytest.mark.ray
def test_unsatisfiable_gpu_request_fails_within_timeout_naming_the_key(local_ray):
    cfg = _cfg("cluster.placement=disaggregated", "trainer.use_gpu=true", "trainer.num_workers=1",
               "rollout.engine_cpus=0.5")
    plan = placement.plan_placement(cfg)
    start = time.monotonic()
    with pytest.raises(PlacementTimeoutError) as info:
        reservation.create_placement_group(plan.bundles, plan.strategy, timeout_s=2, name="too-big")
    elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 8.0
    message = str(info.value)
    assert "cluster.placement_timeout_s" in message
    assert "#0 {CPU: 0.5, GPU: 1}" in message and "#1 {CPU: 1, GPU: 1}" in message  # the bundles
    assert "No live node could hold these" in message
    assert "Cluster available resources: {CPU: 2" in message  # nothing was left reserved by the attempt
    # The pending group was removed, so it is not left behind as autoscaler demand.
    states = [t["state"] for t in ray.util.placement_group_table().values() if t["name"] == "too-big"]
    assert states == ["REMOVED"]


@pytest.mark.ray
def test_cpu_group_larger_than_the_cluster_names_only_the_pending_bundles(local_ray):
    # Each bundle fits a node alone, but together they exceed 2 CPUs: none is "never fits".
    with pytest.raises(PlacementTimeoutError) as info:
        reservation.create_placement_group([{"CPU": 1.5}, {"CPU": 1.5}], "PACK", timeout_s=2, name="cpu-too-big")
    message = str(info.value)
    assert "#0 {CPU: 1.5}, #1 {CPU: 1.5}" in message
    assert "No live node could hold" not in message
    assert "cluster.placement_timeout_s" in message


def test_init_ray_attaches_to_configured_address_without_local_options(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_init.init_ray(_cfg("cluster.address=ray://10.0.0.1:10001", "cluster.num_cpus=4"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_init.init_ray(_cfg())
    monkeypatch.delenv("RAY_ADDRESS")
    ray_init.init_ray(_cfg("cluster.num_cpus=3"), include_dashboard=False)
    assert calls == [
        {"address": "ray://10.0.0.1:10001"},
        {"address": "127.0.0.1:6379"},
        {"num_cpus": 3, "include_dashboard": False, "dashboard_host": "127.0.0.1"},
    ]


def test_init_ray_auth_failure_explains_the_token(monkeypatch):
    def refuse(**kw):
        raise ConnectionError("Missing authentication token")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(RuntimeError, match="RAY_AUTH_MODE=token"):
        ray_init.init_ray(_cfg("cluster.address=10.0.0.1:6379"))


@pytest.mark.ray
def test_driver_counts_the_reward_scorer_before_a_layout_fills_every_cpu(local_ray, tmp_path):
    """A CPU layout of exactly the cluster's 2 CPUs left the reward scorer (0.1 CPU, outside the plan) unplaceable:
    the first rollout waited for ever. The driver now refuses it at start, with the numbers."""
    from ngrpo_ray.distributed.session import Session

    cfg = _cfg("cluster.placement=disaggregated", "trainer.num_workers=1", "rollout.engine_cpus=1",
               f"trainer.output_dir={tmp_path}")
    start = time.monotonic()
    with pytest.raises(placement.PlacementInfeasibleError,
                       match=r"it asks for 2.1 CPUs \(the layout's 2 \+ the reward scorer's 0.1\), the cluster can "
                             r"have at most 2 CPUs"):
        Session(cfg, log=lambda _: None)
    assert time.monotonic() - start < 10.0
    assert not list(tmp_path.iterdir())  # nothing was loaded or written
