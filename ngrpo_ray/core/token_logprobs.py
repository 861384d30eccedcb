"""log_softmax(head(h) / T)[target] and the entropy of that distribution, in memory bounded by a chunk of tokens.

At the paper's shapes (8 x 8,192 response tokens, V = 151,936) the fp32 logits of one micro-batch are 40 GB, and a
plain autograd graph keeps them (and a log-softmax copy) until backward. Here:
  - response tokens go through the output head ``chunk_tokens`` at a time;
  - per chunk, the fp32 log-softmax (the same kernel as before, so the values are the same bit for bit given the
    same logits) and the entropy are computed without gradient, ``_ROWS`` rows at a time in two reused work buffers;
    the entropy is a detached metric;
  - the gradient path is ``_TargetLogProb``: its forward only hands out those values; its backward turns the saved
    chunk logits IN PLACE into (onehot - softmax) * g / T, so backward holds one [chunk, V] tensor, not two;
  - with more than one chunk, each chunk runs under non-reentrant ``torch.utils.checkpoint``: its logits are dropped
    after forward and recomputed (one head matmul) in backward, so at most one chunk's logits are alive at a time.
    The recompute reuses the chunk's log-sum-exp, so it does no V-wide work. The head is called as a module, so
    ZeRO-3 gathers its weight and its gradient reaches the partitions through the ordinary graph.
Peak extra memory: about chunk x V x 4 bytes (+ chunk x V x 2 for a bf16 head) plus 2 x _ROWS x V x 4, independent of
the response length.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

_ROWS = 128  # rows per fp32 log-softmax / entropy step: work buffers of 2 x _ROWS x V fp32


@torch.no_grad()
def _logprob_lse_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[n, V] logits (any float dtype), targets [n] -> fp32 (log-prob of the target, log-sum-exp, entropy or None),
    all of logits / T. Large fresh temporaries would cost page faults on every allocation on CPU (they go back to
    the OS when freed), so two work buffers are reused for every row block."""
    n, V = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp) if with_entropy else None
    z_buf = torch.empty(min(n, _ROWS), V, dtype=torch.float32, device=logits.device)
    ls_buf = torch.empty_like(z_buf)
    for i in range(0, n, _ROWS):
        rows, t = logits[i: i + _ROWS], targets[i: i + _ROWS, None]
        # upcast, then divide in fp32: div(bf16, T, out=fp32) would divide in bf16 and round logits / T once more
        # (up to 0.15 in a log-prob at T 0.7 with 152k-wide bf16 logits); the logits stay untouched
        z = z_buf[: rows.shape[0]].copy_(rows).div_(temperature)
        ls = torch.ops.aten._log_softmax.out(z, -1, False, out=ls_buf[: rows.shape[0]])
        logp[i: i + _ROWS] = ls.gather(-1, t).squeeze(-1)
        lse[i: i + _ROWS] = z.gather(-1, t).squeeze(-1) - logp[i: i + _ROWS]
        if ent is not None:  # H = -sum p log p
            ent[i: i + _ROWS] = -torch.exp(ls, out=z).mul_(ls).sum(dim=-1)
    return logp, lse, ent


class _TargetLogProb(torch.autograd.Function):
    """(logits [n, V], targets [n], lse [n], logp [n]) -> logp, with the gradient of log_softmax(logits / T)[target].

    ``logp`` and ``lse`` were computed from these logits without gradient. Backward consumes the saved logits (it
    overwrites them with the gradient): the graph can be back-propagated once (no retain_graph), as training does."""

    @staticmethod
    def forward(ctx, logits, targets, lse, logp, temperature):
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return logp.clone()

    @staticmethod
    @torch.no_grad()
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        T = ctx.temperature
        g = grad_out.float() / T
        in_place = logits.dtype == torch.float32
        buf = None if in_place else torch.empty(min(logits.shape[0], _ROWS), logits.shape[1], dtype=torch.float32,
                                                device=logits.device)
        for i in range(0, logits.shape[0], _ROWS):  # d/dz = (onehot - softmax(z / T)) * g / T, row block by block
            rows = logits[i: i + _ROWS]
            p = rows.div_(T) if in_place else buf[: rows.shape[0]].copy_(rows).div_(T)  # fp32, as forward
            p.sub_(lse[i: i + _ROWS, None]).exp_().mul_(-g[i: i + _ROWS, None])
            p.scatter_add_(-1, targets[i: i + _ROWS, None], g[i: i + _ROWS, None])
            if not in_place:
                rows.copy_(p)  # into the saved logits, in the head's dtype
        return logits, None, None, None, None


def _chunk(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
           temperature: float, with_entropy: bool, cache: dict) -> torch.Tensor:
    """One chunk's log-probs. ``cache`` keeps what the first call computed, so a checkpoint recompute redoes only
    the head matmul."""
    logits = head(hidden)
    if "logp" not in cache:
        cache["logp"], cache["lse"], cache["entropy"] = _logprob_lse_entropy(logits, targets, temperature,
                                                                             with_entropy)
    if not torch.is_grad_enabled():
        return cache["logp"]
    return _TargetLogProb.apply(logits, targets, cache["lse"], cache["logp"], temperature)


def chunked_token_logprobs(
    head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    min_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, d] (the states that predict each target), targets [N] -> (log-probs [N] fp32, entropy [N] or None).

    log-probs carry the gradient to ``hidden`` and the head's parameters when grad is enabled; entropy never does.
    ``min_chunks``: call the head at least this often (empty chunks fill up): under ZeRO-3 every head call is a
    collective gather, so all ranks must make the same number of calls (the caller agrees on it)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n = hidden.shape[0]
    starts = list(range(0, n, chunk_tokens))
    starts += [n] * max(0, min_chunks - len(starts))  # empty chunks: the head is still called (and back-propagated)
    if not starts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    many = len(starts) > 1 and torch.is_grad_enabled()
    logps, ents = [], []
    for i in starts:
        cache: dict = {}
        h, t = hidden[i: i + chunk_tokens], targets[i: i + chunk_tokens]
        if many:  # drop this chunk's logits after forward; recompute them (one matmul) in backward
            lp = checkpoint(_chunk, head, h, t, temperature, with_entropy, cache, use_reentrant=False)
        else:
            lp = _chunk(head, h, t, temperature, with_entropy, cache)
        logps.append(lp)
        ents.append(cache["entropy"])
    logp = logps[0] if len(logps) == 1 else torch.cat(logps)
    entropy = None if not with_entropy else (ents[0] if len(ents) == 1 else torch.cat(ents))
    return logp, entropy
