"""The train step's off-policy bookkeeping for one rollout batch: the rollout-vs-trainer gap and the rollout
correction weights, from the trainer's pre-update log-probs and the engine's recorded ones (``record.logprobs``).

Where the trainer's pre-update log-probs come from:
  old_logprobs: recompute  the old-log-prob pass (every sequence);
  old_logprobs: rollout    no such pass: the forward of the FIRST mini-batch of the first epoch, which runs before the
                           first optimizer step (no extra forward; ``mismatch/sequences_measured`` says which share of
                           the batch that is). The correction is refused with ``rollout`` (it would be the identity).
Used by ``train_step.train_on_sequences`` in three places: ``observe`` where the pre-update log-probs exist,
``weights_for`` where the loss is formed, ``metrics`` at the end (one all-reduce, the same on every rank).
This module imports no Ray.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ngrpo_ray.core.mismatch import add_gap_sums, empty_gap_sums, finalize_gap, gap_sums, sequence_log_ratios
from ngrpo_ray.core.rollout_correction import RolloutCorrection, correction_weights, finalize_correction


def _pad(values: Sequence[torch.Tensor], T: int) -> torch.Tensor:
    out = torch.zeros(len(values), T, dtype=torch.float32)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v.detach().float().cpu()
    return out


class OffPolicyPass:
    def __init__(self, correction: RolloutCorrection, num_sequences: int):
        self.correction = correction
        self.sums = empty_gap_sums()
        self.rc_sums = {k: torch.zeros((), dtype=torch.float64)
                        for k in ("rc_affected_count", "rc_unit_count", "rc_weight_sum", "rc_token_count")}
        self.seq_log_ratio = torch.zeros(num_sequences, dtype=torch.float64)
        self.measured = torch.zeros(num_sequences, dtype=torch.float64)
        self.weights: dict[int, torch.Tensor] = {}  # global index -> [T_i] correction weights

    def observe(self, seqs: Sequence[Any], trainer_logp: Sequence[torch.Tensor]) -> None:
        """Pre-update trainer log-probs [T_i] of ``seqs`` (TrainSequences): gap statistics, and correction weights
        when a correction is on. A sequence observed twice is counted once."""
        fresh = [(s, lp) for s, lp in zip(seqs, trainer_logp) if self.measured[s.index] == 0]
        if not fresh:
            return
        T = max(max(len(s.record) for s, _ in fresh), 1)
        lengths = torch.tensor([len(s.record) for s, _ in fresh])
        mask = torch.arange(T)[None, :] < lengths[:, None]
        trainer = _pad([lp[: len(s.record)] for s, lp in fresh], T)
        behaviour = _pad([s.record.logprobs for s, _ in fresh], T)
        self.sums = add_gap_sums(self.sums, gap_sums(trainer, behaviour, mask))
        per_seq = sequence_log_ratios(trainer, behaviour, mask)
        for i, (s, _) in enumerate(fresh):
            self.seq_log_ratio[s.index] = per_seq[i]
            self.measured[s.index] = 1.0
        if self.correction.active:
            cw = correction_weights(trainer, behaviour, mask, self.correction)
            self.rc_sums = {k: self.rc_sums[k] + cw.sums[k] for k in self.rc_sums}
            for i, (s, _) in enumerate(fresh):
                self.weights[s.index] = cw.weights[i, : len(s.record)]

    def weights_for(self, seqs: Sequence[Any], T: int, device) -> torch.Tensor | None:
        """[B, T] correction weights of a micro-batch (None when the correction is off)."""
        if not self.correction.active:
            return None
        return _pad([self.weights[s.index] for s in seqs], T).to(device)

    def metrics(self, reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, float]:
        """``mismatch/...`` and ``rollout_correction/...`` numbers of the whole batch; ``reduce`` all-reduces a dict of
        tensors over ranks (SUM, MAX for *_max keys) and must be called alike on every rank."""
        summed = reduce({**self.sums, **self.rc_sums, "gap_seq_log_ratio": self.seq_log_ratio,
                         "gap_measured": self.measured})
        out = {f"mismatch/{k}": v for k, v in
               finalize_gap(summed, summed["gap_seq_log_ratio"], summed["gap_measured"]).items()}
        out.update({f"rollout_correction/{k}": v for k, v in finalize_correction(summed, self.correction).items()})
        return out
