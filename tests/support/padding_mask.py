"""The trainer's forward as it was before it dropped the padding mask: HF's [B, L] padding mask and cumulative
positions put back into the decoder's forward, for tests that compare the two (training.logprobs.causal_positions)."""

from __future__ import annotations

import torch


class PaddingMaskForward:
    """Puts HF's padding mask and cumulative positions back into the decoder's forward (the previous trainer)."""

    def __init__(self, body: torch.nn.Module, prompts, records):
        B, L = len(records), max(int(p.numel()) + len(r) for p, r in zip(prompts, records))
        self.mask = torch.zeros(B, L, dtype=torch.long)
        for b, (p, r) in enumerate(zip(prompts, records)):
            self.mask[b, : int(p.numel()) + len(r)] = 1
        self.body, self.forward = body, body.forward

    def __enter__(self):
        positions = (self.mask.cumsum(1) - 1).clamp_min(0)

        def masked(*args, attention_mask=None, position_ids=None, **kwargs):
            assert attention_mask is None  # the trainer passes none now
            device = kwargs["inputs_embeds"].device
            return self.forward(*args, attention_mask=self.mask.to(device), position_ids=positions.to(device),
                                **kwargs)

        self.body.forward = masked
        return self

    def __exit__(self, *exc):
        self.body.forward = self.forward
