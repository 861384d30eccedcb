"""One trainer rank's work on a rollout batch: rebuild the engine's inputs, recompute log-probs, step the policy.

Per call of ``train_on_sequences`` (every rank at once, each with its shard of the sequences):
  1. old log-probs (recomputed with the current weights, or the rollout's) and reference log-probs (beta > 0),
     both without gradient and before any update;
     The engine-vs-trainer gap (``mismatch/...``) and rollout-correction weights come from those old log-probs and
     the records' (``training.off_policy``);
  2. for each epoch and mini-batch: the GLOBAL token / sequence counts of the mini-batch are all-reduced, then each
     micro-batch (``micro_batches`` even parts, or by the token budget ``max_tokens_per_micro_batch``: see
     ``micro_batches``) runs forward on ``inputs_embeds`` rebuilt from the records (the mixtures the engine fed),
     ``core.losses.policy_loss`` with those global counts, and ``engine.backward``; then one ``engine.step``.
Mini-batches are fixed on the GLOBAL sequence order (seeded shuffle per epoch), and a rank takes every W-th
sequence of each, so the update does not depend on the number of ranks or micro-batches (tested).

Log-probs follow the record contract (``training.logprobs``). This module imports no Ray.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ngrpo_ray.core.losses import (
    GlobalNormalizers,
    PolicyLossConfig,
    finalize_policy_metrics,
    policy_loss,
    reduce_policy_metrics,
)
from ngrpo_ray.core.rollout_correction import RolloutCorrection
from ngrpo_ray.training.logprobs import _pad_rows, _world, batched_logprobs, response_logprobs
from ngrpo_ray.training.micro_batches import global_count, split_micro_batches
from ngrpo_ray.training.off_policy import OffPolicyPass
from ngrpo_ray.training.train_sequence import TrainSequence, seq_tokens
from ngrpo_ray.training.zero3_passes import head_calls, start_pass


@dataclass
class StepSettings:
    temperature: float = 1.0
    mini_batches: int = 1  # optimizer steps per rollout batch
    micro_batches: int = 1  # accumulation steps per mini-batch, per rank
    epochs: int = 1
    old_logprobs: str = "recompute"  # "recompute" (current weights, before the update) or "rollout" (engine's)
    shuffle: bool = True
    seed: int = 0
    pad_id: int = 0
    noise_std: float = 0.0  # gaussian_noise (STHT) records: the std their seeds' noise is scaled by
    rollout_correction: RolloutCorrection = field(default_factory=RolloutCorrection)  # engine-vs-trainer weights
    max_tokens_per_micro_batch: int | None = None  # token budget (padded prompt + response) replacing micro_batches
    logprob_chunk_tokens: int = 1024  # response tokens per output-head chunk (memory O(chunk x V))

    def validate(self) -> None:
        if self.old_logprobs not in ("recompute", "rollout"):
            raise ValueError(f"trainer.old_logprobs must be 'recompute' or 'rollout', got {self.old_logprobs!r}")
        for name in ("mini_batches", "micro_batches", "epochs", "logprob_chunk_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"trainer.max_tokens_per_micro_batch must be >= 1 or None, "
                             f"got {self.max_tokens_per_micro_batch}")
        if self.temperature <= 0:
            raise ValueError(f"trainer.temperature must be > 0, got {self.temperature}")
        if self.rollout_correction.active and self.old_logprobs == "rollout":
            raise ValueError(f"algorithm.rollout_correction={self.rollout_correction.mode!r} needs "
                             "trainer.old_logprobs='recompute' (with 'rollout' the correction is the identity)")


def mini_batch_plan(indices: Sequence[int], mini_batches: int, epoch: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Global mini-batches of sequence indices for one epoch; the same on every rank for any rank count."""
    order = sorted(indices)
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    n = len(order)
    bounds = [round(i * n / mini_batches) for i in range(mini_batches + 1)]
    return [order[bounds[i]: bounds[i + 1]] for i in range(mini_batches)]


def all_reduce_counts(local: GlobalNormalizers, device) -> GlobalNormalizers:
    t = torch.tensor([local.tokens, local.seqs], dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return GlobalNormalizers(tokens=int(round(float(t[0]))), seqs=int(round(float(t[1]))))


def all_reduce_metrics(summed: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    if _world()[1] == 1:
        return summed
    out = {}
    for k in sorted(summed):  # same order on every rank
        t = summed[k].to(device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if k.endswith("_max") else dist.ReduceOp.SUM)
        out[k] = t.cpu().double()
    return out


@dataclass
class TrainStats:
    metrics: dict[str, float] = field(default_factory=dict)


def train_on_sequences(
    engine: Any,  # a DeepSpeed engine (or anything with .module, .backward(loss), .step())
    local: Sequence[TrainSequence],
    all_indices: Sequence[int],
    settings: StepSettings,
    loss_config: PolicyLossConfig,
    ref_model: torch.nn.Module | None = None,
    loss_scale: float = 1.0,
    grad_norm_fn: Callable[[], float | None] | None = None,
    ref_start_pass: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run epochs x mini-batches of updates on this rank's ``local`` sequences. Returns globally reduced metrics.
    ``ref_start_pass``: called before each reference forward pass (training.reference_model under ZeRO-3)."""
    settings.validate()
    rank, world = _world()
    model = engine.module
    device = next(model.parameters()).device
    # Decided on the GLOBAL count, so every rank raises alike instead of one waiting in a collective for the other.
    if len(all_indices) < world:
        raise ValueError(f"the batch has {len(all_indices)} sequences for {world} trainer ranks: it needs at least "
                         f"one per rank (no sequences for some rank)")
    # 1. old and reference log-probs, before any update
    model.eval()
    budget, chunk_tokens = settings.max_tokens_per_micro_batch, settings.logprob_chunk_tokens
    # One optimizer step per batch: the weights before the update are the ones of the training forward, so its own
    # log-probs (detached) are the old ones. That saves a forward pass, and the ratio is exactly 1: a separate pass
    # cut into other micro-batches can differ by a few bf16 ulps, which GSPO's 3e-4 clip would already see.
    on_policy = settings.old_logprobs == "recompute" and settings.mini_batches == 1 and settings.epochs == 1
    if on_policy:
        old = [None] * len(local)
    elif settings.old_logprobs == "recompute":
        old = batched_logprobs(model, local, settings.temperature, settings.pad_id, noise_std=settings.noise_std,
                               max_tokens=budget, chunk_tokens=chunk_tokens, start_pass=lambda: start_pass(engine))
    else:
        old = [s.record.logprobs.float() for s in local]
    # off-policy: the engine-vs-trainer gap and the rollout-correction weights (on-policy and rollout mode: observed
    # in the micro-batches below, before the step)
    off_policy = OffPolicyPass(settings.rollout_correction, len(all_indices))
    if settings.old_logprobs == "recompute" and not on_policy:
        off_policy.observe(local, old)
    ref = None
    if loss_config.beta != 0.0:
        if ref_model is None:
            raise ValueError(f"loss beta={loss_config.beta} needs a reference model (trainer.ref_model)")
        ref = batched_logprobs(ref_model, local, settings.temperature, settings.pad_id, noise_std=settings.noise_std,
                               max_tokens=budget, chunk_tokens=chunk_tokens, start_pass=ref_start_pass)
    model.train()
    by_index = {s.index: (s, o, ref[i] if ref is not None else None) for i, (s, o) in enumerate(zip(local, old))}

    per_step: list[dict[str, torch.Tensor]] = []
    grad_norms: list[float] = []
    for epoch in range(settings.epochs):
        for mb_i, mb in enumerate(mini_batch_plan(all_indices, settings.mini_batches, epoch, settings.seed,
                                                  settings.shuffle)):
            mine = [by_index[i] for i in mb if i in by_index]
            counts = GlobalNormalizers(tokens=sum(len(s.record) for s, _, _ in mine),
                                       seqs=sum(1 for s, _, _ in mine if len(s.record) > 0))
            norm = all_reduce_counts(counts, device if device.type != "cpu" else torch.device("cpu"))
            step_metrics: list[dict[str, torch.Tensor]] = []
            micro_list = split_micro_batches(mine, [seq_tokens(m[0]) for m in mine], settings.micro_batches, budget)
            if budget is not None:  # every rank runs as many micro-batches as the busiest one (dummies fill up)
                micro_list += [[] for _ in range(max(1, global_count(len(micro_list), device)) - len(micro_list))]
            # ZeRO-3: every micro-batch calls the head equally often, so its parameter trace holds (zero3_passes)
            calls = head_calls([sum(len(m[0].record) for m in (micro or [by_index[local[0].index]]))
                                for micro in micro_list], chunk_tokens, model, budget)
            for j, micro in enumerate(micro_list):
                # We own the accumulation boundary (DeepSpeed's micro-step counter drifts when the count changes
                # between calls): reduce and update only after the last micro-batch, then one step().
                set_boundary(engine, j == len(micro_list) - 1)
                begin_micro_batch(engine)
                weight = 1.0
                if not micro:  # keep the collective schedule identical on every rank: a zero-weight dummy
                    micro, weight = [by_index[local[0].index]], 0.0
                seqs = [m[0] for m in micro]
                tb = response_logprobs(model, [s.prompt_ids for s in seqs], [s.record for s in seqs],
                                       settings.temperature, settings.pad_id, with_entropy=True,
                                       noise_std=settings.noise_std, chunk_tokens=chunk_tokens, head_calls=calls)
                T = tb.logp.shape[1]
                if on_policy:  # a dummy's sequence is observed too: every weight is there before it is asked for
                    off_policy.observe(seqs, [tb.logp[j].detach() for j in range(len(seqs))])
                elif settings.old_logprobs == "rollout" and epoch == 0 and mb_i == 0 and weight > 0:
                    off_policy.observe(seqs, [tb.logp[j].detach() for j in range(len(seqs))])  # before any step
                old_t = tb.logp.detach() if on_policy else _pad_rows([m[1] for m in micro], T, device)
                ref_t = _pad_rows([m[2] for m in micro], T, device) if ref is not None else None
                adv = _advantages([s.advantage for s in seqs], T, device)
                out = policy_loss(tb.logp, old_t, adv, tb.mask, loss_config, norm, ref_logp=ref_t, entropy=tb.entropy,
                                  is_weights=off_policy.weights_for(seqs, T, device))
                engine.backward(out.loss * (weight * loss_scale), scale_wrt_gas=False)
                # a dummy contributes zeros, so every rank reduces the same keys in the same order
                step_metrics.append(out.metrics if weight > 0 else {k: v * 0 for k, v in out.metrics.items()})
            engine.step()
            if grad_norm_fn is not None:
                gn = grad_norm_fn()
                if gn is not None:
                    grad_norms.append(float(gn))
            per_step.append(reduce_policy_metrics(step_metrics))
    summary = _summarise(per_step, grad_norms, device)
    summary.update(off_policy.metrics(lambda sums: all_reduce_metrics(sums, device)))
    return summary


def begin_micro_batch(engine: Any) -> None:
    """What DeepSpeedEngine.forward does first. We run ``engine.module`` directly (hidden states, then the head in
    chunks), so DeepSpeed must be told a new micro-batch starts: ZeRO-3 counts its micro-steps here (without it every
    micro-batch's gradient partition overwrote the previous one instead of adding to it, and only the last
    micro-batch of an optimizer step counted), and ZeRO-1/2 reset their per-backward hook state; then the root
    module's forward pre-hook (ZeRO-3's parameter trace: ``zero3_passes``). No-op elsewhere."""
    clear = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if clear is not None:
        clear()
    start_pass(engine)


def set_boundary(engine: Any, is_boundary: bool) -> None:
    """DeepSpeed's manual accumulation boundary (stays set: we set it before every backward); no-op elsewhere."""
    setter = getattr(engine, "set_gradient_accumulation_boundary", None)
    if setter is not None:
        setter(is_boundary)


def _advantages(values: Sequence[torch.Tensor], T: int, device) -> torch.Tensor:
    if all(v.dim() == 0 for v in values):
        return torch.stack([v.float() for v in values]).to(device)
    return _pad_rows([v.expand(T) if v.dim() == 0 else v for v in values], T, device)


def _summarise(per_step: list[dict[str, torch.Tensor]], grad_norms: list[float], device) -> dict[str, float]:
    """Per optimizer step: all-reduce the sums over ranks, finalize; then average over steps (loss summed is a
    mini-batch value, so the mean over steps is the mean mini-batch loss)."""
    keys = sorted({k for m in per_step for k in m})
    finals = []
    for m in per_step:
        filled = {k: m.get(k, torch.tensor(0.0, dtype=torch.float64)) for k in keys}
        finals.append(finalize_policy_metrics(all_reduce_metrics(filled, device)))
    out: dict[str, float] = {}
    for k in finals[0]:
        vals = [f[k] for f in finals]
        out[k] = sum(vals) if k in ("tokens", "seqs") else sum(vals) / len(vals)
    out["optimizer_steps"] = float(len(per_step))
    if grad_norms:
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out
