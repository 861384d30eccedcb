"""The one typed configuration of a workflow run.

Every section is a dataclass; `ngrpo_ray.config.load` builds it from YAML presets plus dotted overrides and rejects
unknown keys, wrong types and values outside a Literal with a message that names the key. Defaults follow the N-GRPO
paper (arXiv 2606.10768, appendix B.2) unless a comment says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ngrpo_ray.core import mixing_spec

# The mixing options' allowed values come from core.mixing_spec (declared once; ranges are checked there too).
Strategy = Literal[mixing_spec.STRATEGIES]
Metric = Literal[mixing_spec.METRICS]


@dataclass
class ModelConfig:
    # HF model id, a local folder, or "smollm2-135m-instruct" (the offline demo model, converted once and cached).
    path: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: Optional[str] = None  # defaults to `path`
    cache_dir: str = "~/.cache/ngrpo_ray/models"
    gpus_expected: str = "none (CPU)"  # documentation for presets: what hardware the preset was written for


@dataclass
class DataConfig:
    train: str = "arithmetic_demo"  # a benchmark name from ngrpo_ray.data or a local json/jsonl/parquet path
    validation: Optional[str] = None
    question_field: str = "problem"
    answer_field: str = "answer"
    prompt_template: Literal["r1", "released_code", "gpqa", "demo", "plain"] = "r1"
    use_chat_template: bool = True
    append_think: Literal["auto", "always", "never"] = "auto"
    max_prompt_tokens: int = 4096
    limit: Optional[int] = None  # use only the first N problems (after the seeded shuffle)
    seed: int = 0


@dataclass
class RolloutConfig:
    num_engines: int = 1
    group_size: int = 4  # G samples per prompt
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 8192
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end a response (besides EOS); never mixed
    gpu_memory_utilization: float = 0.3
    kv_cache_space_gib: Optional[float] = None  # CPU only: VLLM_CPU_KVCACHE_SPACE
    enforce_eager: bool = True
    tensor_parallel_size: int = 1  # ranks (GPUs) one engine is split over, within one node (vocab-parallel mixing)
    engine_cpus: float = 1.0  # per engine rank (a split engine's bundle holds engine_cpus x tensor_parallel_size)
    engine_gpus: float = 1.0
    seed: int = 0


@dataclass
class MixingConfig:
    strategy: Strategy = "neighbor_mix"
    rho: float = 0.1  # gate probability per decode step (paper eq. 11)
    k: int = 3  # anchor + k-1 neighbors
    tau: Optional[float] = None  # alpha temperature; None -> rollout.temperature (paper: the same tau)
    metric: Metric = "cosine"
    alpha_source: Literal[mixing_spec.ALPHA_SOURCES] = "logits"  # paper eq. 9 | released code
    emit: Literal[mixing_spec.EMIT_MODES] = "anchor"  # text token of a mixed step: paper | released code
    stop_after: list[str] = field(default_factory=list)  # e.g. ["</think>"]: no mixing after the marker
    never_mix: list[str] = field(default_factory=lambda: ["<eos>"])  # "<eos>" means the tokenizer's EOS
    noise_std: float = 0.05  # gaussian_noise (STHT)
    gumbel_tau: float = 1.0  # gumbel_topk / latent_gumbel
    # candidates for gumbel_topk / soft_thinking / latent_gumbel; null (all tokens) only for soft_thinking, and the
    # engine serves at most mixing_spec.ENGINE_MAX_WIDTH (refused at config time)
    top_k: Optional[int] = 10
    noise_clamp: list[float] = field(default_factory=lambda: [-1.5, 3.0])  # latent_gumbel: Gumbel noise clamp
    one_sided: bool = True  # latent_gumbel: shift the clamped noise by -noise_clamp[0] so it is >= 0
    noise_scale: float = 1.0  # latent_gumbel: scores = logp + noise_scale * noise
    table_slots: int = 1 << 20  # hook ring-table capacity; overflow raises
    # Seed of every response's gate / noise-seed stream (core.gate_stream: key = H(seed, strategy, purpose, call,
    # global index)); responses, prompts, iterations and methods differ through the key, runs through this seed
    # (`ngrpo compare` sets it to each compare seed).
    seed: int = 0


@dataclass
class AlgorithmConfig:
    loss_type: Literal["grpo", "gspo", "gspo_token", "dr_grpo"] = "grpo"
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: Optional[float] = None
    beta: float = 0.001  # KL coefficient; 0 skips the reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # DAPO dynamic sampling (training/dynamic_sampling.py): groups whose rewards are all equal are dropped and the
    # batch refilled with new prompts until it holds trainer.prompts_per_iteration groups with signal, for at most
    # max_resample_rounds extra rollout rounds (then padded with zero-advantage groups; every count is logged)
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    mask_truncated: bool = False  # Latent-GRPO invalid-sample masking
    first_token_selection: bool = False  # Latent-GRPO optimal correct-path first-token selection
    # Engine-vs-trainer correction (core/rollout_correction.py), from r = pi_old / pi_behaviour (trainer's recomputed
    # old log-prob over the engine's recorded one): "tis" weights each token's policy-gradient term by min(r, cap);
    # "mis" drops tokens (or sequences) whose r leaves [1/cap, cap]. Level "sequence": r = exp(sum of the response's
    # log ratios), one weight per sequence. Needs trainer.old_logprobs: recompute (with rollout, r = 1).
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    rollout_correction_level: Literal["token", "sequence"] = "token"
    rollout_correction_cap: float = 2.0


@dataclass
class TrainerConfig:
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prompts_per_iteration: int = 16  # B; the rollout batch is B * G responses
    mini_batches: int = 4  # optimizer steps per rollout batch (paper: gradient accumulation 4)
    micro_batch_size: int = 4  # responses per forward/backward
    # Memory at the paper's shapes (8k responses, 152k vocabulary). A token budget per micro-batch (prompt + response
    # tokens, padding removed) replaces micro_batch_size when set; log-probs and entropy run over chunks of this many
    # response tokens so no [tokens, vocab] fp32 tensor exists at once.
    max_tokens_per_micro_batch: Optional[int] = None
    logprob_chunk_tokens: int = 1024
    gradient_checkpointing: bool = False
    epochs_per_batch: int = 1
    # old log-probs of the PPO ratio: recomputed by the trainer before the update (one extra forward), or the
    # engine's rollout log-probs (exact up to ~1e-4 here, since the trainer rebuilds the mixed inputs)
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    # One-step-off asynchronous rollouts (distributed/async_rollouts.py): the engines generate iteration i+1 with
    # policy version v while the trainer turns iteration i into v+1; the weight sync waits for that rollout to end.
    # Needs a ratio that knows the behaviour policy: old_logprobs: rollout, or recompute with a rollout_correction.
    async_rollouts: bool = False
    # samples drawn more than this many policy versions before the trainer's are dropped, never trained on
    # (one-step-off keeps every sample at staleness 0 or 1, so only 1 is accepted; training.staleness holds the rule)
    max_staleness: int = 1
    iterations: int = 100
    epochs: Optional[int] = None  # if set, overrides iterations to cover the train set this many times
    validate_every: int = 0
    validate_before: bool = False  # validate the initial policy too (logged at step 0; the demo's "before")
    # a key the validation logs: val/<metric> (pooled) or val/<benchmark>/<metric>, e.g. val/aime24/mean_at_n; the
    # best checkpoint (checkpoints/best/, never pruned) has the highest value
    best_metric: str = "val/mean_at_n"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2  # rolling iter_* checkpoints kept (checkpoints/best/ comes on top)
    # HF export (trainer/hf, in model.dtype) at checkpoints whose iteration is a multiple of this; 0: only at the end
    # of the run and for the best checkpoint, which always get one
    hf_export_every: int = 0
    output_dir: str = "runs/default"
    seed: int = 0


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None -> RAY_ADDRESS or a local cluster
    num_cpus: Optional[int] = None  # local cluster only
    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    placement_timeout_s: float = 600.0
    # auto: CUDA IPC to colocated GPU engines, nccl to disaggregated ones, gloo on CPU; nccl needs GPUs
    sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    sync_timeout_s: float = 120.0
    sync_bucket_mb: int = 64
    engine_max_restarts: int = 2  # Ray restarts a dead rollout engine this often; its chunk is re-issued
    engine_restart_timeout_s: float = 900.0  # wait this long for a restarted engine to load its model again
    trainer_max_restarts: int = 2  # Ray Train restarts a dead trainer worker group this often; the last checkpoint is reloaded
    dashboard_host: str = "127.0.0.1"


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None  # None -> MLFLOW_TRACKING_URI or sqlite under the run folder
    experiment: str = "ngrpo"
    run_name: Optional[str] = None
    plots: bool = True


@dataclass
class EvalConfig:
    benchmarks: list[str] = field(default_factory=lambda: ["math500", "aime24", "aime25", "amc23"])
    n: int = 32
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    mixing: bool = False  # paper section 4.6: off at evaluation
    grading: Literal["last_boxed", "whole_response", "strict_string"] = "last_boxed"
    grade_timeout_s: float = 5.0
    grade_workers: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
