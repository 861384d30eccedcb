"""The frozen reference model of the KL term (algorithm.beta > 0), partitioned like the policy under ZeRO-3.

Under ZeRO-3 every rank holds 1/N of the policy's parameters, and a full reference copy per rank would be the largest
resident term (P x b: 14.2 GiB for the 7B in bf16, against 1.8 GiB for the policy's own weights). So the reference goes
through DeepSpeed's ZeRO-3 without an optimizer, as OpenRLHF wraps its reference (its eval config: the policy's stage,
no optimizer): 1/N per rank, each module gathered while it runs. Its passes reset ZeRO-3's trace like the policy's
(``start_pass``). Under ZeRO-0/1/2 the policy's weights are whole on every rank, and the reference is a plain copy.
This module imports no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings, build_reference_config
from ngrpo_ray.training.zero3_passes import start_pass


@dataclass
class ReferenceModel:
    module: torch.nn.Module
    engine: Any = None  # DeepSpeed's engine under ZeRO-3, else None

    def start_pass(self) -> None:
        """Before each forward pass: ZeRO-3's trace of the reference's own module calls (no-op without ZeRO-3)."""
        if self.engine is not None:
            start_pass(self.engine)


def load_reference_model(model_path: str, dtype: torch.dtype, device: torch.device, settings: DeepSpeedSettings,
                         world_size: int) -> ReferenceModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.requires_grad_(False)
    if settings.zero_stage != 3:
        return ReferenceModel(model.to(device).eval())
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config=build_reference_config(settings, world_size))
    engine.module.eval()
    return ReferenceModel(engine.module, engine)
