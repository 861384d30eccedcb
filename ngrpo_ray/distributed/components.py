"""Translate the one typed Config into the settings objects of each component (engine, mixing, trainer, loss)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ngrpo_ray.config import Config
from ngrpo_ray.core import mixing_spec
from ngrpo_ray.core.losses import PolicyLossConfig
from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.core.rollout_correction import RolloutCorrection
from ngrpo_ray.distributed.placement import engines_on_trainer_gpus
from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig
from ngrpo_ray.distributed.weight_sync import choose_sync_backend
from ngrpo_ray.models.vocabulary import token_ids_of
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
from ngrpo_ray.training.train_step import StepSettings


def mixing_params(cfg: Config, tokenizer: Any, enabled: bool = True) -> MixingParams:
    m = cfg.mixing
    if not enabled:
        return MixingParams(strategy="sample", rho=0.0, k=m.k)
    return MixingParams(
        strategy=m.strategy, rho=m.rho, k=m.k, tau=m.tau, metric=m.metric, alpha_source=m.alpha_source, emit=m.emit,
        stop_after_ids=token_ids_of(tokenizer, m.stop_after), never_mix_ids=token_ids_of(tokenizer, m.never_mix),
        noise_std=m.noise_std, gumbel_tau=m.gumbel_tau, top_k=m.top_k, noise_clamp=tuple(m.noise_clamp),
        one_sided=m.one_sided, noise_scale=m.noise_scale, seed=m.seed,
    )


def rollout_sampling(cfg: Config) -> dict:
    r = cfg.rollout
    return {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "max_tokens": r.max_new_tokens,
            # on top of the tokenizer's EOS; make_sampling_params also makes them never-mixed anchors
            "stop_token_ids": list(r.stop_token_ids)}


def eval_sampling(cfg: Config) -> dict:
    e = cfg.eval
    return {"temperature": e.temperature, "top_p": e.top_p, "top_k": -1, "max_tokens": e.max_new_tokens,
            "stop_token_ids": list(cfg.rollout.stop_token_ids)}  # the same stops as the training rollouts


def engine_spec(cfg: Config, model_path: str, max_prompt_tokens: int) -> dict:
    r, m = cfg.rollout, cfg.mixing
    longest = max(r.max_new_tokens, cfg.eval.max_new_tokens)
    spec: dict[str, Any] = {
        "model": model_path,
        "seed": r.seed,
        "max_model_len": int(max_prompt_tokens + longest + 8),
        "max_num_seqs": 256 if r.engine_gpus and cfg.trainer.use_gpu else 64,
        "enforce_eager": r.enforce_eager,
        "table_capacity": int(m.table_slots),
        "k_max": mixing_spec.engine_width(dataclasses.asdict(m)),  # the ring's record width (k or top_k)
        "noise_table": m.strategy == "gaussian_noise",
        "never_mix": tuple(m.never_mix),  # never neighbors either (resolved with the model's tokenizer)
        # the table of the configured metric is built at install, not in the first mixed decode step
        "neighbor_metrics": (m.metric,) if m.strategy == "neighbor_mix" else (),
        "dtype": "float32" if cfg.model.dtype == "float32" else cfg.model.dtype,
        "tensor_parallel_size": r.tensor_parallel_size,  # vocab-parallel mixing embedding (engine.embedding_patch)
        # the trainer sends its weights through vLLM's weight-transfer API with this backend
        "weight_transfer_backend": choose_sync_backend(
            cfg.cluster.sync_backend, cfg.trainer.use_gpu,
            same_gpu=engines_on_trainer_gpus(cfg.cluster.placement, cfg.trainer.use_gpu)),
    }
    if cfg.trainer.use_gpu:
        # colocated: the engine shares a trainer rank's GPU and sleeps (frees it) during the update
        spec["enable_sleep_mode"] = cfg.cluster.placement == "colocated"
        spec["gpu_memory_utilization"] = r.gpu_memory_utilization
        spec["kv_cache_gib"] = None
    else:
        spec["kv_cache_gib"] = r.kv_cache_space_gib if r.kv_cache_space_gib else 1.0
    return spec


def trainer_config(cfg: Config, model_path: str, pad_id: int, storage_path: str | None = None,
                   plan: Any = None) -> TrainerGroupConfig:
    """`plan` (placement.PlacementPlan): the trainer's Ray resources per worker and placement strategy come from it."""
    t, a, m = cfg.trainer, cfg.algorithm, cfg.mixing
    rollout_batch = t.prompts_per_iteration * cfg.rollout.group_size
    per_rank_mini = rollout_batch // (t.mini_batches * t.num_workers)
    micro = max(1, -(-per_rank_mini // t.micro_batch_size))
    loss = PolicyLossConfig(
        loss_type=a.loss_type, eps_low=a.eps_low, eps_high=a.eps_high, dual_clip=a.dual_clip,
        beta=a.beta, kl_estimator=a.kl_estimator, aggregation=a.aggregation,
        max_len=cfg.rollout.max_new_tokens if a.aggregation == "seq_mean_token_sum_norm" else None,
    )
    return TrainerGroupConfig(
        model_path=model_path,
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        cpus_per_worker=1.0,
        resources_per_worker=dict(plan.trainer_resources) if plan is not None else None,
        placement_strategy=plan.strategy if plan is not None else "PACK",
        start_timeout_s=cfg.cluster.placement_timeout_s,
        torch_threads=1 if t.num_workers > 1 else 2,
        deepspeed=DeepSpeedSettings(zero_stage=t.zero_stage, dtype="bf16" if cfg.model.dtype == "bfloat16" else "fp32",
                                    lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip),
        step=StepSettings(temperature=cfg.rollout.temperature, mini_batches=t.mini_batches, micro_batches=micro,
                          epochs=t.epochs_per_batch, old_logprobs=t.old_logprobs, seed=t.seed,
                          pad_id=pad_id, noise_std=m.noise_std,
                          rollout_correction=RolloutCorrection(a.rollout_correction, a.rollout_correction_level,
                                                               a.rollout_correction_cap),
                          max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                          logprob_chunk_tokens=t.logprob_chunk_tokens),
        gradient_checkpointing=t.gradient_checkpointing,
        loss=loss,
        ref_model=a.beta > 0,
        seed=t.seed,
        storage_path=storage_path,
        max_failures=cfg.cluster.trainer_max_restarts,
        sync_backend=cfg.cluster.sync_backend,
        empty_cuda_cache=bool(plan is not None and plan.sleep_engines),
    )
