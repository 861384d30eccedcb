"""The one interface every exploration strategy implements, and the per-batch state they share.

A strategy is ``fn(logits [B, V], E [V, d], state: MixState, generator: torch.Generator) -> StepResult``.
``generator`` drives token sampling only. Every other random draw of a step (the gate, the Gaussian-noise seeds, the
Gumbel noise of gumbel_topk / latent_gumbel) comes from each row's counter-based stream (core.gate_stream, keyed
like the engine's: seed, strategy, purpose, call, row index), so the reference generator gates and perturbs a
response exactly where and as the engine does, and a replay recomputes the draws. So for the same ``generator``
state every strategy samples exactly the tokens "sample" would at its unmixed rows, and rho = 0 equals "sample" bit
for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.core.mixing_params import MixingParams, SamplingParams
from ngrpo_ray.core.neighbors import LazyNeighborTable

AUX_SEED_OFFSET = 0x5EED  # stream seed = sampling seed + this, when MixingParams.seed is None


@dataclass
class StepResult:
    """One decoding step for a batch of B rows (see the record contract in ngrpo_ray.core.records)."""

    tokens: torch.Tensor  # [B] int64 emitted text token
    inputs_embeds: torch.Tensor  # [B, d] input of the next step
    mixed: torch.Tensor  # [B] bool: inputs_embeds[b] is not E[tokens[b]]
    cand_ids: torch.Tensor  # [B, k] int64
    alpha: torch.Tensor  # [B, k] float32
    logprobs: torch.Tensor  # [B] float32 log softmax(logits / temperature)[tokens]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MixState:
    """What persists across the steps of one batch: parameters, neighbor table, stream keys, stopped rows."""

    params: MixingParams
    sampling: SamplingParams
    stopped: torch.Tensor  # [B] bool: row emitted a stop_after id, no more mixing
    table: LazyNeighborTable | torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [V] bool rows allowed as neighbors
    step: int = 0
    stream_keys: torch.Tensor | None = None  # [B] int64 gate-stream key per row (core.gate_stream)

    @classmethod
    def create(cls, params: MixingParams, sampling: SamplingParams, batch_size: int, device: torch.device | str,
               sampling_seed: int = 0, table: LazyNeighborTable | torch.Tensor | None = None,
               valid: torch.Tensor | None = None, purpose: str = "train", call: int = 0,
               first_index: int = 0) -> "MixState":
        """Row b's gate stream is the engine's for the response with global index first_index + b."""
        seed = params.seed if params.seed is not None else sampling_seed + AUX_SEED_OFFSET
        stopped = torch.zeros(batch_size, dtype=torch.bool, device=device)
        keys = torch.tensor([gate_stream.stream_key(seed, params.strategy, purpose, call, first_index + b)
                             for b in range(batch_size)], dtype=torch.int64, device=device)
        return cls(params, sampling, stopped, table, valid, stream_keys=keys)

    def neighbors(self, E: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """[n] anchors -> [n, k] candidate sets C (anchor first), building a lazy table on first use."""
        if self.table is None:
            self.table = LazyNeighborTable(E, self.params.k, self.params.metric, self.valid)
        if isinstance(self.table, LazyNeighborTable):
            return self.table.lookup(anchors)
        return self.table[anchors]

    def _steps(self, batch_size: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch_size,), self.step, dtype=torch.int64, device=device)

    def gate(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[B] Bernoulli(rho) draw from each row's stream at this step (no generator state is consumed)."""
        u = gate_stream.uniforms(self.stream_keys.to(device), self._steps(batch_size, device))
        return u < self.params.rho

    def noise_seeds(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[B] int64 Gaussian-noise seeds in [0, 2**62) from each row's stream at this step."""
        return gate_stream.noise_seeds(self.stream_keys.to(device), self._steps(batch_size, device))

    def gumbel(self, batch_size: int, width: int, device: torch.device) -> torch.Tensor:
        """[B, width] float32 Gumbel(0, 1) noise from each row's stream at this step, column j for rank j."""
        return gate_stream.gumbel(self.stream_keys.to(device), self._steps(batch_size, device), width)

    def allowed(self, would_emit: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """[B] rows where mixing is allowed: not stopped, anchor not in never_mix_ids, and the token this step
        would emit is not a stop_after id (the marker itself is fed as a clean token). With emit "sampled" the
        emitted token is not the anchor: it must not be a never-mix id either (the engine emits a virtual id at a
        mixed step, which would hide an EOS from vLLM's stop check)."""
        ok = ~self.stopped
        if self.params.never_mix_ids:
            never = _ids(self.params.never_mix_ids, anchors.device)
            ok &= ~torch.isin(anchors, never) & ~torch.isin(would_emit, never)
        if self.params.stop_after_ids:
            stop = _ids(self.params.stop_after_ids, anchors.device)
            ok &= ~torch.isin(would_emit, stop) & ~torch.isin(anchors, stop)
        return ok

    def after_step(self, tokens: torch.Tensor) -> None:
        if self.params.stop_after_ids:
            self.stopped |= torch.isin(tokens, _ids(self.params.stop_after_ids, tokens.device))
        self.step += 1


def _ids(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def unmixed_record(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cand_ids = token repeated, alpha = [1, 0, ...]: the contract's filler for unmixed rows."""
    cand = tokens.unsqueeze(1).expand(-1, k).clone()
    alpha = torch.zeros(tokens.shape[0], k, dtype=torch.float32, device=tokens.device)
    alpha[:, 0] = 1.0
    return cand, alpha
