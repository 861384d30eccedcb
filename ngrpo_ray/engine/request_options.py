"""Per-request mixing options as they travel in ``SamplingParams.extra_args["ngrpo"]`` (a plain dict).

The driver turns a ``MixingParams`` (core.strategies) or a dict into this wire form; the worker parses it back.
Both sides live here so the two can never drift apart. The allowed values and ranges, and what the engine can serve,
come from core.mixing_spec (declared once; the config loader refuses the same values at config time). No vLLM import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ngrpo_ray.core import mixing_spec
from ngrpo_ray.core.mixing_spec import METRICS, STRATEGIES_IN_ENGINE  # noqa: F401  (re-exported)

EXTRA_ARGS_KEY = "ngrpo"


@dataclass(frozen=True)
class RequestMixing:
    """What the sampler hook needs for one request."""

    strategy: str = "neighbor_mix"
    rho: float = 0.0
    k: int = 3
    tau: float | None = None  # None -> the request's sampling temperature
    metric: str = "cosine"
    stop_after_ids: tuple[int, ...] = ()  # once one of these is emitted, the request never mixes again
    never_mix_ids: tuple[int, ...] = ()  # an anchor in this set is never mixed
    seed: int | None = None  # the run's mixing seed (core.gate_stream); None -> the seed the hook was installed with
    no_mix_anchor_ids: tuple[int, ...] = field(default=())  # EOS / stop ids: mixing them would hide the stop
    noise_std: float = 0.0  # gaussian_noise (STHT): gated inputs are E[sampled] + noise_std * N(0, I)
    alpha_source: str = "logits"  # neighbor_mix: "filtered_probs" = probs after top-k/top-p, renormalised over C
    emit: str = "anchor"  # "sampled": the text token is vLLM's sampled one, the mixture only the next input
    width: int = 3  # record width: k (neighbor_mix, gaussian_noise) or top_k (gumbel_topk, soft_thinking, ...)
    gumbel_tau: float = 1.0  # gumbel_topk / latent_gumbel: weights = softmax(scores / gumbel_tau)
    noise_clamp: tuple[float, float] = (-1.5, 3.0)  # latent_gumbel
    one_sided: bool = True  # latent_gumbel
    noise_scale: float = 1.0  # latent_gumbel
    # Who this response is, for its gate / noise-seed stream (core.gate_stream): purpose code, call (policy version
    # or benchmark position), global index (prompt index x group size + group position). index None: the hook
    # numbers such requests in the order they join (reproducible only for the same submission order).
    stream_purpose: int = 0
    stream_call: int = 0
    stream_index: int | None = None

    def key(self) -> tuple:
        return (self.strategy, self.rho, self.k, self.tau, self.metric, self.stop_after_ids, self.never_mix_ids,
                self.no_mix_anchor_ids, self.noise_std, self.alpha_source, self.emit, self.width, self.gumbel_tau,
                self.noise_clamp, self.one_sided, self.noise_scale)


def _as_dict(mixing: Any) -> dict:
    if mixing is None:
        return {}
    if isinstance(mixing, dict):
        return dict(mixing)
    if dataclasses.is_dataclass(mixing):
        return dataclasses.asdict(mixing)
    raise TypeError(f"mixing must be a MixingParams, a dict or None, got {type(mixing).__name__}")


def to_wire(mixing: Any, stop_token_ids: list[int] | tuple[int, ...] = ()) -> dict:
    """Plain, msgpack-safe dict for ``extra_args["ngrpo"]``; raises ValueError on a value the engine cannot honour
    (the ranges of core.mixing_spec, then its engine capabilities)."""
    d = _as_dict(mixing)
    d.setdefault("strategy", "neighbor_mix")
    for key, message in mixing_spec.problems(d) + mixing_spec.engine_problems(d):
        raise ValueError(f"mixing.{key} {message}")
    strategy = str(d["strategy"])
    rho = mixing_spec.gate_rho(d)
    tau = d.get("tau")
    seed = d.get("seed")
    noise_std = float(d.get("noise_std", 0.0) or 0.0) if strategy == "gaussian_noise" else 0.0
    clamp = d.get("noise_clamp") or (-1.5, 3.0)
    return {
        "strategy": strategy, "rho": rho, "k": int(d.get("k", 3)), "tau": None if tau is None else float(tau),
        "metric": str(d.get("metric", "cosine")),
        "stop_after_ids": [int(x) for x in (d.get("stop_after_ids") or ())],
        "never_mix_ids": [int(x) for x in (d.get("never_mix_ids") or ())],
        "seed": None if seed is None else int(seed),
        "no_mix_anchor_ids": sorted({int(x) for x in stop_token_ids}),
        "noise_std": noise_std,
        "alpha_source": str(d.get("alpha_source", "logits")), "emit": str(d.get("emit", "anchor")),
        "width": int(mixing_spec.record_width(d)),
        "gumbel_tau": float(d.get("gumbel_tau", 1.0)), "noise_clamp": [float(clamp[0]), float(clamp[1])],
        "one_sided": bool(d.get("one_sided", True)), "noise_scale": float(d.get("noise_scale", 1.0)),
    }


def with_stream(wire: dict, purpose: int, call: int, index: int) -> dict:
    """A copy of a request's wire dict that names its gate stream (core.gate_stream)."""
    return {**wire, "stream": [int(purpose), int(call), int(index)]}


def from_wire(d: dict) -> RequestMixing:
    return RequestMixing(
        strategy=d["strategy"], rho=float(d["rho"]), k=int(d["k"]), tau=d.get("tau"), metric=d["metric"],
        stop_after_ids=tuple(d.get("stop_after_ids", ())), never_mix_ids=tuple(d.get("never_mix_ids", ())),
        seed=d.get("seed"), no_mix_anchor_ids=tuple(d.get("no_mix_anchor_ids", ())),
        noise_std=float(d.get("noise_std", 0.0)), alpha_source=d.get("alpha_source", "logits"),
        emit=d.get("emit", "anchor"), width=int(d.get("width", d["k"])), gumbel_tau=float(d.get("gumbel_tau", 1.0)),
        noise_clamp=tuple(d.get("noise_clamp", (-1.5, 3.0))), one_sided=bool(d.get("one_sided", True)),
        noise_scale=float(d.get("noise_scale", 1.0)),
        **_stream_fields(d.get("stream")),
    )


def _stream_fields(stream: list | None) -> dict:
    if stream is None:
        return {}
    purpose, call, index = stream
    return {"stream_purpose": int(purpose), "stream_call": int(call), "stream_index": int(index)}
