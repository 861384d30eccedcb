"""DeepSpeed settings for the trainer group: ZeRO stage 0-3, bf16 or fp32, gloo on CPU and NCCL on GPU.

Gradient accumulation is ours, not DeepSpeed's: the loss of every micro-batch is already divided by the GLOBAL
token / sequence count of its mini-batch, so the gradient must be the plain SUM over micro-batches and ranks.
DeepSpeed divides by its accumulation steps (``scale_wrt_gas``; the train step passes False and sets the accumulation
boundary itself) and averages over data-parallel ranks (undone by ``loss_scale_for_deepspeed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 2
    dtype: str = "fp32"  # "fp32" or "bf16"
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # "adamw" or "sgd" (sgd: no momentum; the gradient-parity tests use lr 1)
    offload_optimizer: bool = False  # ZeRO-2/3 optimizer states on CPU
    warmup_steps: int = 0

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"trainer.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"trainer.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"trainer.optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.dtype == "bf16" and self.zero_stage == 0:
            raise ValueError("trainer.dtype 'bf16' needs zero_stage >= 1 (DeepSpeed keeps fp32 master weights there)")


def dist_backend(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def build_config(s: DeepSpeedSettings, micro_batches: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config. Batch sizes are bookkeeping only (we feed micro-batches of any size)."""
    s.validate()
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batches * world_size,
        "gradient_clipping": s.grad_clip,
        "zero_optimization": {"stage": s.zero_stage},
        "bf16": {"enabled": s.dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # torch AdamW/SGD as client optimizers (no compiled CPU-Adam op)
        "wall_clock_breakdown": False,
    }
    if s.zero_stage >= 2:
        cfg["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True})
        if s.dtype == "bf16":
            # accumulate gradients over micro-batches in fp32 (DeepSpeed's default is the model dtype, bf16: the head's
            # [V, d] gradient summed chunk by chunk and micro-batch by micro-batch in bf16), as OpenRLHF does
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if s.offload_optimizer and s.zero_stage >= 2:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if s.zero_stage == 3:
        # Keep whole parameters gathered for the weight sync and logprob passes only when asked to.
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return cfg


def build_reference_config(s: DeepSpeedSettings, world_size: int) -> dict[str, Any]:
    """The frozen reference model's config (training.reference_model): the policy's ZeRO stage and dtype, no
    optimizer; under ZeRO-3 DeepSpeed then partitions its parameters and gathers each module while it runs."""
    s.validate()
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": s.zero_stage},
        "bf16": {"enabled": s.dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(s: DeepSpeedSettings, params) -> torch.optim.Optimizer:
    """A client optimizer (works on CPU without DeepSpeed's compiled CPU-Adam op)."""
    params = [p for p in params if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=0.0, weight_decay=s.weight_decay)
    return torch.optim.AdamW(params, lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)


def build_scheduler(s: DeepSpeedSettings, optimizer: torch.optim.Optimizer):
    if s.warmup_steps <= 0:
        return None
    warm = s.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warm))


def loss_scale_for_deepspeed(world_size: int, micro_batches: int) -> float:
    """Undo DeepSpeed's 1/world_size gradient averaging: we want sums. (Its 1/gas scaling is switched off by
    ``backward(..., scale_wrt_gas=False)``, so ``micro_batches`` does not enter.)"""
    del micro_batches
    return float(world_size)


def init_distributed(use_gpu: bool) -> None:
    """Set up torch.distributed for DeepSpeed (Ray Train has usually done it already; DeepSpeed then reuses it)."""
    import deepspeed

    if not use_gpu:
        skip_shm_inference_op()
    deepspeed.init_distributed(dist_backend=dist_backend(use_gpu))


def skip_shm_inference_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts (about 35 s on 2 cores, once
    per install, and a failure on a machine without a C++ compiler). Only its inference all-reduce (AutoTP) uses it;
    training's collectives go through torch.distributed. Mark it incompatible, DeepSpeed's own fallback for platforms
    without it (its ``ops/__init__`` keeps the probed dict so such edits persist)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
