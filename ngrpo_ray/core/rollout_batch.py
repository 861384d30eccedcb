"""RolloutBatch: what one generate call hands to the trainer, as plain tensors (no vLLM, no Ray).

Per response b (length T_b, the records contract): response_ids [T] (the anchor at mixed steps), logprobs [T]
(log_softmax(logits / temperature) of the emitted token), mixed_mask [T], cand_ids [T, k], alpha [T, k].
``to_padded`` lays them out as [B, L] rows of [prompt; response] (records at positions prompt_len + t).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ngrpo_ray.core.records import ResponseRecord, align_records

FINISH_REASONS = ("stop", "length")


@dataclass
class PaddedRollout:
    """[B, L] training view of a RolloutBatch."""

    input_ids: torch.Tensor  # [B, L] int64, prompt then response, padded
    attention_mask: torch.Tensor  # [B, L] int64
    position_ids: torch.Tensor  # [B, L] int64
    response_mask: torch.Tensor  # [B, L] bool, True at response tokens
    mixed_mask: torch.Tensor  # [B, L] bool, True where the input at that position is a mixture
    cand_ids: torch.Tensor  # [B, L, k] int64
    alpha: torch.Tensor  # [B, L, k] float32
    old_logprobs: torch.Tensor  # [B, L] float32: logprob of input_ids[b, p] given the prefix; 0 off the response


@dataclass
class RolloutBatch:
    prompt_ids: list[torch.Tensor]  # B x [P_b] int64
    response_ids: list[torch.Tensor]  # B x [T_b] int64
    response_text: list[str]
    logprobs: list[torch.Tensor]  # B x [T_b] float32
    mixed_mask: list[torch.Tensor]  # B x [T_b] bool
    cand_ids: list[torch.Tensor]  # B x [T_b, k] int64
    alpha: list[torch.Tensor]  # B x [T_b, k] float32
    finish_reason: list[str]  # "stop" | "length"
    group_index: torch.Tensor  # [B] int64: which prompt of the call
    sample_index: torch.Tensor  # [B] int64: which sample of that prompt
    policy_version: torch.Tensor  # [B] int64: weights version that generated the response
    timings: dict[str, float] = field(default_factory=dict)  # generation_s, tokens, tokens_per_s
    noise_seed: list[torch.Tensor] | None = None  # B x [T_b] int64 (-1: no noise): the gaussian_noise baseline

    def __post_init__(self) -> None:
        B = len(self.prompt_ids)
        lists = dict(response_ids=self.response_ids, response_text=self.response_text, logprobs=self.logprobs,
                     mixed_mask=self.mixed_mask, cand_ids=self.cand_ids, alpha=self.alpha,
                     finish_reason=self.finish_reason)
        for name, value in lists.items():
            if len(value) != B:
                raise ValueError(f"RolloutBatch.{name} has {len(value)} entries, prompt_ids has {B}")
        for name in ("group_index", "sample_index", "policy_version"):
            if tuple(getattr(self, name).shape) != (B,):
                raise ValueError(f"RolloutBatch.{name} must have shape [{B}], got {tuple(getattr(self, name).shape)}")
        for b in range(B):
            T = int(self.response_ids[b].numel())
            if (self.logprobs[b].shape != (T,) or self.mixed_mask[b].shape != (T,)
                    or self.cand_ids[b].shape[0] != T or self.alpha[b].shape != self.cand_ids[b].shape):
                raise ValueError(f"RolloutBatch response {b}: record lengths disagree with response_ids ({T})")
            if self.noise_seed is not None and self.noise_seed[b].shape != (T,):
                raise ValueError(f"RolloutBatch response {b}: noise_seed length disagrees with response_ids ({T})")
            if self.finish_reason[b] not in FINISH_REASONS:
                raise ValueError(f"RolloutBatch.finish_reason[{b}]={self.finish_reason[b]!r}, "
                                 f"expected one of {FINISH_REASONS}")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return sum(int(r.numel()) for r in self.response_ids)

    @property
    def num_mixed(self) -> int:
        return sum(int(m.sum()) for m in self.mixed_mask)

    @property
    def mixed_fraction(self) -> float:
        return self.num_mixed / max(self.num_tokens, 1)

    def records(self) -> list[ResponseRecord]:
        seeds = self.noise_seed or [None] * len(self)
        return [ResponseRecord(response_ids=r, logprobs=lp, mixed_mask=m, cand_ids=c, alpha=a,
                               stop_reason=f, extras={} if s is None else {"noise_seed": s})
                for r, lp, m, c, a, f, s in zip(self.response_ids, self.logprobs, self.mixed_mask, self.cand_ids,
                                                self.alpha, self.finish_reason, seeds)]

    def to_padded(self, pad_id: int, padding_side: str = "right") -> PaddedRollout:
        aligned = align_records(self.prompt_ids, self.records(), pad_id=pad_id, padding_side=padding_side)
        old = torch.zeros(aligned.input_ids.shape, dtype=torch.float32)
        old[aligned.response_mask] = torch.cat([lp.float() for lp in self.logprobs]) if len(self) else old[:0, 0]
        return PaddedRollout(aligned.input_ids, aligned.attention_mask, aligned.position_ids, aligned.response_mask,
                             aligned.mixed_mask, aligned.cand_ids, aligned.alpha, old)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """One batch from several (group indices are offset so groups stay distinct; timings are summed)."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        groups, offset = [], 0
        for b in batches:
            groups.append(b.group_index + offset)
            offset += int(b.group_index.max()) + 1 if len(b) else 0
        timings: dict[str, float] = {}
        for b in batches:
            for key in ("generation_s", "tokens"):
                timings[key] = timings.get(key, 0.0) + float(b.timings.get(key, 0.0))
        if timings.get("generation_s"):
            timings["tokens_per_s"] = timings["tokens"] / timings["generation_s"]
        cat = lambda name: [x for b in batches for x in getattr(b, name)]  # noqa: E731
        noise = None
        if any(b.noise_seed is not None for b in batches):
            noise = [x for b in batches
                     for x in (b.noise_seed or [torch.full((int(r.numel()),), -1, dtype=torch.long)
                                                for r in b.response_ids])]
        return RolloutBatch(
            prompt_ids=cat("prompt_ids"), response_ids=cat("response_ids"), response_text=cat("response_text"),
            logprobs=cat("logprobs"), mixed_mask=cat("mixed_mask"), cand_ids=cat("cand_ids"), alpha=cat("alpha"),
            finish_reason=cat("finish_reason"), group_index=torch.cat(groups),
            sample_index=torch.cat([b.sample_index for b in batches]),
            policy_version=torch.cat([b.policy_version for b in batches]), timings=timings, noise_seed=noise,
        )
