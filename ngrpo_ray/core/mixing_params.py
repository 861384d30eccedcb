"""Parameters of the exploration strategies (mixing) and of plain token sampling, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ngrpo_ray.core import mixing_spec
from ngrpo_ray.core.mixing_spec import ALPHA_SOURCES, EMIT_MODES, STRATEGIES  # noqa: F401  (re-exported)


def _require(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"mixing.{field} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Plain temperature sampling with optional top-k / top-p filtering (vLLM naming: top_k <= 0 means off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"sampling.top_k must be an int (<= 0 means off), got {self.top_k!r}")


@dataclass(frozen=True)
class MixingParams:
    """One exploration strategy and its knobs. Defaults follow the N-GRPO paper (section 3, appendix B).

    rho gates every mixing strategy per row and step (m ~ Bernoulli(rho), eq. 11); use rho=1 for baselines that
    perturb every step (STHT, soft thinking, Latent-GRPO). It is ignored by "sample".
    """

    strategy: str = "neighbor_mix"
    rho: float = 0.1
    k: int = 3
    tau: float | None = None  # None -> the sampling temperature (eq. 9 uses the temperature-scaled logits)
    metric: str = "cosine"
    alpha_source: str = "logits"  # "filtered_probs": released code, probs after top-k/top-p renormalised over C
    emit: str = "anchor"  # "sampled": released code, the text token is the sampled one, the mixture only the input
    stop_after_ids: tuple[int, ...] = ()  # mixing stops for a row once it emitted one of these (e.g. </think>)
    never_mix_ids: tuple[int, ...] = ()  # a step whose anchor is one of these is never mixed (e.g. EOS)
    noise_std: float = 0.1  # gaussian_noise: input = E[token] + noise_std * N(0, I)
    gumbel_tau: float = 1.0  # gumbel_topk / latent_gumbel: weights = softmax(scores / gumbel_tau)
    top_k: int | None = 10  # candidates of gumbel_topk / soft_thinking / latent_gumbel (soft_thinking: None = all)
    noise_clamp: tuple[float, float] = (-1.5, 3.0)  # latent_gumbel: Gumbel noise clamped to this range
    one_sided: bool = True  # latent_gumbel: shift the clamped noise by -noise_clamp[0] so it is >= 0
    noise_scale: float = 1.0  # latent_gumbel: scores = logp + noise_scale * noise
    seed: int | None = None  # seeds the gate / noise generator; None derives it from the sampling generator

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, message in mixing_spec.problems(values):  # the ranges, declared once in core.mixing_spec
            raise ValueError(f"mixing.{key} {message}")
        for field in ("stop_after_ids", "never_mix_ids"):
            ids = getattr(self, field)
            _require(isinstance(ids, tuple) and all(isinstance(i, int) and i >= 0 for i in ids), field,
                     "a tuple of non-negative ints", ids)

    @property
    def mixes(self) -> bool:
        return self.strategy != "sample"

    def record_width(self, vocab_size: int) -> int:
        """Number of candidate columns in cand_ids / alpha for this strategy."""
        return mixing_spec.record_width({"strategy": self.strategy, "k": self.k, "top_k": self.top_k}, vocab_size)
