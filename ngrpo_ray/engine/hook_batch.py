"""What the sampler hook keeps between its calls: the opted-in rows of a batch composition, and what the pre-hook
computed for the post-hook of the same sampler call (one ``GatedGroup`` per kind of gated row). No vLLM import."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

# Kinds of gated rows, in the order the pre-hook groups them (each kind has its own device kernel).
NEIGHBOR, SOFT, NOISE = 0, 1, 2


@dataclass
class Composition:
    """The opted-in rows of one batch composition (rebuilt only when vLLM's persistent batch changes)."""

    req_ids: list[str]
    rows: np.ndarray  # [H] batch rows that opted in
    slots: np.ndarray  # [H] their request slots
    rows_t: torch.Tensor  # the same on device
    slots_t: torch.Tensor
    every_row: bool  # rows == 0..B-1: no copy of the [B, V] logits needed
    unit_temp: bool
    any_stop: bool  # some request has stop_after ids: the post-hook updates the stopped flags
    temps: torch.Tensor  # [H] device temperatures
    # Host facts of the opted-in rows that let the kernels skip work every row would do for nothing:
    kinds: np.ndarray  # [H] kernel kind of each row
    one_kind: bool  # every row has the same kind: the gated rows need no grouping
    full_k: bool  # every row mixes k_max neighbors: no padding columns
    emits_sampled: bool  # some row emits vLLM's sampled token (emit "sampled")
    filtered: bool  # some row takes the filtered-probability alpha


@dataclass
class GatedGroup:
    """The gated rows of one kind (positions [start, end) of the pending gated rows) and what their kernel computed.

    ``mixed``: the row mixes unless the post-hook finds its emitted token banned (emit "sampled"); ``anchor``: the
    text token of a mixed step unless ``emit_sampled`` says vLLM's sampled one; ``anchor_logprob``: its logprob
    (None: the post-hook derives it from vLLM's logprob of the drawn token, ``z`` and ``anchor_z``)."""

    kind: int
    start: int
    end: int
    mixed: torch.Tensor | None = None  # [n] bool
    cand: torch.Tensor | None = None  # [n, k_max]
    alpha: torch.Tensor | None = None  # [n, k_max]
    anchor: torch.Tensor | None = None  # [n]
    anchor_logprob: torch.Tensor | None = None  # [n]
    emit_sampled: torch.Tensor | None = None  # [n] bool; None: every row emits its anchor
    z: torch.Tensor | None = None  # [n, V] logits at temperature 1 (the reuse path's anchor logprob)
    anchor_z: torch.Tensor | None = None  # [n]
    noise: torch.Tensor | None = None  # [n, d] (gaussian_noise)
    noise_seed: torch.Tensor | None = None  # [n] int64 (gaussian_noise)


@dataclass
class Pending:
    """What the pre-hook computed for the post-hook of the same sampler call."""

    comp: Composition
    scaled_logits: torch.Tensor | None  # [H, V] logits / temperature; None: vLLM's logprob is reused
    log_norm: torch.Tensor | None  # [H] logsumexp of scaled_logits
    g_rows: torch.Tensor | None = None  # [G] batch rows of the gated rows, grouped by kind
    g_slots: torch.Tensor | None = None  # [G] request slots
    g_pos: torch.Tensor | None = None  # [G] positions among the opted-in rows
    groups: list[GatedGroup] = field(default_factory=list)

    @property
    def num_gated(self) -> int:
        return 0 if self.g_rows is None else int(self.g_rows.shape[0])


def log_norm(z: torch.Tensor) -> torch.Tensor:
    """[n, V] -> [n] logsumexp. On CPU through log_softmax (its kernel is several times faster than logsumexp's
    there), read at the row's maximum where the log-probability is nearest 0, so no precision is lost."""
    if z.device.type != "cpu":
        return torch.logsumexp(z, dim=-1)
    top = z.argmax(dim=-1, keepdim=True)
    return (z.gather(1, top) - torch.log_softmax(z, dim=-1).gather(1, top)).squeeze(1)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host numpy -> device tensor without waiting for the device (pinned staging on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def pad_columns(cand: torch.Tensor, alpha: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, w] -> [n, width] records: padding columns repeat the first candidate with alpha 0 (exact zeros)."""
    extra = width - cand.shape[1]
    if extra <= 0:
        return cand, alpha
    return (torch.cat([cand, cand[:, :1].expand(-1, extra)], 1),
            torch.cat([alpha, alpha.new_zeros(alpha.shape[0], extra)], 1))
