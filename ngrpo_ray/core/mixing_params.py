"""Parameters of the exploration strategies (mixing) and of plain token sampling, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from ngrpo_ray.core.neighbors import METRICS

STRATEGIES = ("sample", "neighbor_mix", "gaussian_noise", "gumbel_topk", "soft_thinking", "latent_gumbel")
ALPHA_SOURCES = ("logits", "filtered_probs")
EMIT_MODES = ("anchor", "sampled")


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
        _require(self.strategy in STRATEGIES, "strategy", f"one of {STRATEGIES}", self.strategy)
        _require(isinstance(self.rho, (int, float)) and 0.0 <= self.rho <= 1.0, "rho", "a float in [0, 1]", self.rho)
        _require(isinstance(self.k, int) and self.k >= 1, "k", "an int >= 1", self.k)
        _require(self.tau is None or self.tau > 0, "tau", "None or a float > 0", self.tau)
        _require(self.metric in METRICS, "metric", f"one of {METRICS}", self.metric)
        _require(self.alpha_source in ALPHA_SOURCES, "alpha_source", f"one of {ALPHA_SOURCES}", self.alpha_source)
        _require(self.emit in EMIT_MODES, "emit", f"one of {EMIT_MODES}", self.emit)
        for field in ("stop_after_ids", "never_mix_ids"):
            ids = getattr(self, field)
            _require(isinstance(ids, tuple) and all(isinstance(i, int) and i >= 0 for i in ids), field,
                     "a tuple of non-negative ints", ids)
        _require(self.noise_std >= 0, "noise_std", "a float >= 0", self.noise_std)
        _require(self.gumbel_tau > 0, "gumbel_tau", "a float > 0", self.gumbel_tau)
        top_k_ok = (self.top_k is None and self.strategy == "soft_thinking") or (
            isinstance(self.top_k, int) and self.top_k >= 1)
        _require(top_k_ok, "top_k", "an int >= 1 (None only with strategy 'soft_thinking')", self.top_k)
        lo_hi = self.noise_clamp
        _require(len(lo_hi) == 2 and lo_hi[0] < lo_hi[1], "noise_clamp", "a pair (low, high) with low < high", lo_hi)
        _require(self.noise_scale > 0, "noise_scale", "a float > 0", self.noise_scale)
        _require(self.seed is None or isinstance(self.seed, int), "seed", "None or an int", self.seed)

    @property
    def mixes(self) -> bool:
        return self.strategy != "sample"

    def record_width(self, vocab_size: int) -> int:
        """Number of candidate columns in cand_ids / alpha for this strategy."""
        if self.strategy in ("sample", "neighbor_mix", "gaussian_noise"):
            return self.k
        return vocab_size if self.top_k is None else min(self.top_k, vocab_size)
