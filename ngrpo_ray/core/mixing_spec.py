"""The mixing options, declared once: type, allowed values, range, and what the vLLM engine can serve.

Every layer reads this module: ``config.schema.MixingConfig`` (the Literal types), ``config.load.validate`` (ranges,
engine capabilities at config time), ``core.mixing_params.MixingParams`` (its checks) and
``engine.request_options.to_wire`` (the same checks on the wire). Pure Python, no torch import.

``problems(values)`` lists (key, message) for every value out of its range plus the cross-field rules;
``engine_problems(values)`` the settings the engine hook cannot serve. Messages start with "must", so a caller
prefixes the key ("'mixing.rho' must lie in [0, 1], got 1.5").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STRATEGIES = ("sample", "neighbor_mix", "gaussian_noise", "gumbel_topk", "soft_thinking", "latent_gumbel")
SOFT_STRATEGIES = ("gumbel_topk", "soft_thinking", "latent_gumbel")  # candidates = top-K of the log-probabilities
GUMBEL_STRATEGIES = ("gumbel_topk", "latent_gumbel")  # Gumbel noise from the response's stream (core.gate_stream)
INFERENCE_ONLY = ("soft_thinking",)  # no training preset uses it: evaluation only
METRICS = ("cosine", "l2", "l1", "dot")
ALPHA_SOURCES = ("logits", "filtered_probs")
EMIT_MODES = ("anchor", "sampled")
# The strategies the vLLM sampler hook implements (engine.mixing_hook): all of them.
STRATEGIES_IN_ENGINE = STRATEGIES
# Widest record the engine's ring table holds per mixed step (its k_max): top_k "all tokens" (null) would need a
# [slots, V] table, so the engine serves soft thinking over a finite top_k only.
ENGINE_MAX_WIDTH = 64


@dataclass(frozen=True)
class Range:
    """A numeric range; ``low_open`` / ``high_open`` exclude the bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return True

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            return f"lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {self.low:g}"
        return f"be {'<' if self.high_open else '<='} {self.high:g}"


@dataclass(frozen=True)
class Option:
    """One mixing option: Python type, allowed values (choices) or range, and whether None is allowed."""

    type: type
    choices: tuple | None = None
    range: Range | None = None
    nullable: bool = False
    doc: str = ""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else "must not be null"
        if self.choices is not None:
            return None if value in self.choices else f"must be one of {self.choices}, got {value!r}"
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            return f"must be an integer, got {value!r}"
        if self.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"must be a number, got {value!r}"
        if self.type is bool and not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
        if self.range is not None and not self.range.holds(value):
            return f"must {self.range.text()}{' or null' if self.nullable else ''}, got {value!r}"
        return None


OPTIONS: dict[str, Option] = {
    "strategy": Option(str, choices=STRATEGIES, doc="exploration strategy"),
    "rho": Option(float, range=Range(0.0, 1.0), doc="gate probability per decode step (paper eq. 11)"),
    "k": Option(int, range=Range(1), doc="neighbor_mix: anchor + k-1 neighbors"),
    "tau": Option(float, range=Range(0.0, low_open=True), nullable=True,
                  doc="neighbor_mix alpha temperature; null: the sampling temperature"),
    "metric": Option(str, choices=METRICS, doc="neighbor metric over the embedding rows"),
    "alpha_source": Option(str, choices=ALPHA_SOURCES, doc="paper eq. 9 | released code (filtered probs over C)"),
    "emit": Option(str, choices=EMIT_MODES, doc="text token of a mixed step: the anchor (paper) | the sampled one"),
    "noise_std": Option(float, range=Range(0.0), doc="gaussian_noise (STHT): input E[token] + noise_std N(0, I)"),
    "gumbel_tau": Option(float, range=Range(0.0, low_open=True), doc="gumbel_topk / latent_gumbel softmax temperature"),
    "top_k": Option(int, range=Range(1), nullable=True,
                    doc="candidates of gumbel_topk / soft_thinking / latent_gumbel; null (all tokens): soft_thinking"),
    "noise_clamp": Option(tuple, doc="latent_gumbel: Gumbel noise clamped to (low, high)"),
    "one_sided": Option(bool, doc="latent_gumbel: shift the clamped noise by -low so it is >= 0"),
    "noise_scale": Option(float, range=Range(0.0, low_open=True), doc="latent_gumbel: scores = logp + scale * noise"),
    "seed": Option(int, nullable=True, doc="seed of every response's counter-based stream (core.gate_stream)"),
}


def problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for every declared option of ``values`` out of range, plus the cross-field rules."""
    out = []
    for key, option in OPTIONS.items():
        if key in values:
            msg = option.problem(values[key])
            if msg is not None:
                out.append((key, msg))
    if values.get("top_k", 1) is None and values.get("strategy") != "soft_thinking":
        out.append(("top_k", "must be an integer >= 1 (null, all tokens, only with strategy 'soft_thinking'), "
                             "got None"))
    clamp = values.get("noise_clamp")
    if clamp is not None and not (len(clamp) == 2 and all(isinstance(c, (int, float)) for c in clamp)
                                  and clamp[0] < clamp[1]):
        out.append(("noise_clamp", f"must be a pair [low, high] with low < high, got {clamp!r}"))
    return out


def gate_rho(values: dict[str, Any]) -> float:
    """The probability that a step mixes: rho, or 0 for "sample" (which ignores it)."""
    return 0.0 if values.get("strategy", "neighbor_mix") == "sample" else float(values.get("rho", 0.0) or 0.0)


def record_width(values: dict[str, Any], vocab_size: int | None = None) -> int | None:
    """Candidate columns of a mixed step's record (cand_ids / alpha); None: the whole vocabulary (unknown here)."""
    strategy = values.get("strategy", "neighbor_mix")
    if strategy not in SOFT_STRATEGIES:
        return int(values.get("k", 3))
    top_k = values.get("top_k", 10)
    if top_k is None:
        return vocab_size
    return int(top_k) if vocab_size is None else min(int(top_k), vocab_size)


def engine_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for the settings the vLLM sampler hook cannot serve (checked at config time)."""
    out = []
    strategy = values.get("strategy", "neighbor_mix")
    if strategy not in STRATEGIES_IN_ENGINE:
        out.append(("strategy", f"must be one the engine implements {STRATEGIES_IN_ENGINE}, got {strategy!r}"))
    if strategy in SOFT_STRATEGIES:
        width = record_width(values)
        if width is None or width > ENGINE_MAX_WIDTH:
            out.append(("top_k", f"must be an integer <= {ENGINE_MAX_WIDTH} in the engine (each mixed step records "
                                 f"top_k candidates in the ring table; all tokens would need a [slots, V] table), got "
                                 f"{values.get('top_k')!r}"))
    return out


def engine_width(values: dict[str, Any], minimum: int = 4) -> int:
    """The ring table's width (EngineSpec.k_max) an engine needs to serve these options."""
    width = record_width(values) or ENGINE_MAX_WIDTH
    return max(width, int(values.get("k", 3)), minimum)
