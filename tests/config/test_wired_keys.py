"""rollout.stop_token_ids and cluster.sync_backend reach what they configure; algorithm.kl_mode is gone."""

import pytest

from ngrpo_ray.config import ConfigError, load_config
from ngrpo_ray.distributed import components
from ngrpo_ray.distributed.weight_sync import choose_sync_backend


def test_stop_token_ids_reach_the_sampling_of_rollouts_and_validation():
    cfg = load_config("cpu_default", ["rollout.stop_token_ids=[7, 11]"])
    assert components.rollout_sampling(cfg)["stop_token_ids"] == [7, 11]
    assert components.eval_sampling(cfg)["stop_token_ids"] == [7, 11]
    assert components.rollout_sampling(load_config("cpu_default"))["stop_token_ids"] == []


def test_stop_token_ids_become_engine_stops_and_never_mixed_anchors():
    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.engine.llm_factory import make_sampling_params
    from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY

    cfg = load_config("cpu_default", ["rollout.stop_token_ids=[7, 11]"])
    sp = make_sampling_params(components.rollout_sampling(cfg), MixingParams(rho=0.5, k=3), stop_token_ids=[2])
    assert sp.stop_token_ids == [2, 7, 11]  # the tokenizer's EOS (2 here) and the configured ones
    assert sp.extra_args[EXTRA_ARGS_KEY]["no_mix_anchor_ids"] == [2, 7, 11]


def test_stop_token_ids_must_be_ids():
    with pytest.raises(ConfigError, match="rollout.stop_token_ids"):
        load_config("cpu_default", ["rollout.stop_token_ids=[-1]"])


def test_sync_backend_choice():
    # the names are vLLM weight-transfer backends: ours for CPU (ngrpo_gloo), vLLM's nccl / ipc on GPU
    assert choose_sync_backend("auto", use_gpu=False) == "ngrpo_gloo"
    assert choose_sync_backend("auto", use_gpu=True) == "nccl"
    assert choose_sync_backend("auto", use_gpu=True, same_gpu=True) == "ipc"  # colocated: engines on trainer GPUs
    assert choose_sync_backend("gloo", use_gpu=True) == "ngrpo_gloo"  # host-memory transport on a GPU run
    assert choose_sync_backend("nccl", use_gpu=True) == "nccl"
    assert choose_sync_backend("nccl", use_gpu=True, same_gpu=True) == "nccl"  # asked for by name
    with pytest.raises(ValueError, match="needs GPUs"):
        choose_sync_backend("nccl", use_gpu=False)


def test_sync_backend_reaches_the_trainer_group_and_nccl_without_gpus_is_refused():
    cfg = load_config("cpu_default", ["cluster.sync_backend=gloo"])
    assert components.trainer_config(cfg, "model", pad_id=0).sync_backend == "gloo"
    with pytest.raises(ConfigError, match="cluster.sync_backend"):
        load_config("cpu_default", ["cluster.sync_backend=nccl"])
    gpu = load_config("r1_distill_1p5b_ngrpo", ["cluster.sync_backend=nccl"])
    assert components.trainer_config(gpu, "model", pad_id=0).sync_backend == "nccl"
    # and the engines are built with the matching vLLM weight_transfer_config
    assert components.engine_spec(cfg, "model", 64)["weight_transfer_backend"] == "ngrpo_gloo"
    assert components.engine_spec(gpu, "model", 64)["weight_transfer_backend"] == "nccl"


@pytest.mark.parametrize("layout", ["colocated", "disaggregated"])
def test_the_plan_the_engines_and_the_trainer_agree_on_the_weight_transfer(layout):
    """Colocated on GPU every engine gets vLLM's ipc transfer (its weights from its own GPU's trainer rank), apart
    they get nccl: the plan's transport, the engines' vLLM weight_transfer_config and the trainer's backend match."""
    from ngrpo_ray.distributed.placement import engines_on_trainer_gpus, plan_placement

    cfg = load_config("r1_distill_1p5b_ngrpo", [f"cluster.placement={layout}"]
                      + (["trainer.num_workers=4", "rollout.num_engines=4"] if layout == "disaggregated" else []))
    plan = plan_placement(cfg)
    engine = components.engine_spec(cfg, "model", 64)["weight_transfer_backend"]
    trainer = choose_sync_backend(components.trainer_config(cfg, "model", pad_id=0).sync_backend, True,
                                  same_gpu=engines_on_trainer_gpus(cfg.cluster.placement, cfg.trainer.use_gpu))
    want = "ipc" if layout == "colocated" else "nccl"
    assert set(plan.transports) == {want} and engine == trainer == want


def test_kl_mode_is_not_a_key():
    with pytest.raises(ConfigError, match="unknown key 'algorithm.kl_mode'"):
        load_config("cpu_default", ["algorithm.kl_mode=loss"])


def test_dynamic_sampling_keys_are_checked():
    cfg = load_config("cpu_default", ["algorithm.dynamic_sampling=true", "algorithm.max_resample_rounds=2"])
    assert cfg.algorithm.max_resample_rounds == 2
    with pytest.raises(ConfigError, match="algorithm.max_resample_rounds"):
        load_config("cpu_default", ["algorithm.max_resample_rounds=-1"])
    with pytest.raises(ConfigError, match="algorithm.dynamic_sampling"):
        load_config("cpu_default", ["algorithm.dynamic_sampling=true", "rollout.group_size=1",
                                    "trainer.mini_batches=1", "trainer.prompts_per_iteration=4"])


def test_sync_backend_gloo_shows_in_the_gpu_placement_plan():
    from ngrpo_ray.distributed.placement import plan_placement

    assert set(plan_placement(load_config("r1_distill_1p5b_ngrpo")).transports) == {"ipc"}  # colocated
    assert set(plan_placement(load_config("r1_distill_1p5b_ngrpo", ["cluster.placement=disaggregated",
                                                                    "trainer.num_workers=4", "rollout.num_engines=4"]
                                          )).transports) == {"nccl"}
    assert set(plan_placement(load_config("r1_distill_1p5b_ngrpo", ["cluster.sync_backend=gloo"])).transports) == {
        "gloo"}
