"""What the trainer group is built from (``TrainerGroupConfig``) and how it fails (its errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ngrpo_ray.core.losses import PolicyLossConfig
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
from ngrpo_ray.training.train_step import StepSettings


class TrainerGroupError(RuntimeError):
    """A trainer command failed on some rank, or the worker group died."""


class TrainerRestarted(TrainerGroupError):
    """Ray Train restarted the worker group (a worker died): the new workers hold the initial model until
    ``TrainerGroup.recover()`` and the caller restore the last checkpoint."""


@dataclass
class TrainerGroupConfig:
    model_path: str  # HF directory of the initial policy (and of the reference model)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # From the placement plan (placement.plan_placement): Ray Train's resources_per_worker and placement strategy.
    # None: {"CPU": cpus_per_worker} (+ one GPU when use_gpu).
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: str = "PACK"
    start_timeout_s: float = 600.0  # every worker must have started (its bundle placed) by then: cluster.placement_timeout_s
    torch_threads: int = 1  # per worker on CPU; keep the product with num_workers below the core count
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    step: StepSettings = field(default_factory=StepSettings)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    ref_model: bool | None = None  # None: load it only when loss.beta != 0
    gradient_checkpointing: bool = False  # HF activation checkpointing (non-reentrant) of the policy's layers
    collective_timeout_s: float = 600.0
    command_timeout_s: float = 3600.0
    max_failures: int = 0  # worker-group restarts Ray Train may make after a worker dies (FailureConfig)
    sync_backend: str = "auto"  # cluster.sync_backend (weight_sync.choose_sync_backend)
    empty_cuda_cache: bool = False  # colocated on GPU (plan.sleep_engines): hand cached blocks back after update and sync
    seed: int = 0
    storage_path: str | None = None  # Ray Train's run folder; a temp dir by default
