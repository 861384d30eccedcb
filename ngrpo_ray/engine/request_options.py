"""Per-request mixing options as they travel in ``SamplingParams.extra_args["ngrpo"]`` (a plain dict).

The driver turns a ``MixingParams`` (core.strategies) or a dict into this wire form; the worker parses it back.
Both sides live here so the two can never drift apart. No vLLM import.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

EXTRA_ARGS_KEY = "ngrpo"
STRATEGIES_IN_ENGINE = ("neighbor_mix", "gaussian_noise", "sample")  # names of core.mixing_params.MixingParams.strategy
METRICS = ("cosine", "l2", "l1", "dot")


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
    # Who this response is, for its gate / noise-seed stream (core.gate_stream): purpose code, call (policy version
    # or benchmark position), global index (prompt index x group size + group position). index None: the hook
    # numbers such requests in the order they join (reproducible only for the same submission order).
    stream_purpose: int = 0
    stream_call: int = 0
    stream_index: int | None = None

    def key(self) -> tuple:
        return (self.strategy, self.rho, self.k, self.tau, self.metric, self.stop_after_ids, self.never_mix_ids,
                self.no_mix_anchor_ids, self.noise_std)


def _as_dict(mixing: Any) -> dict:
    if mixing is None:
        return {}
    if isinstance(mixing, dict):
        return dict(mixing)
    if dataclasses.is_dataclass(mixing):
        return dataclasses.asdict(mixing)
    raise TypeError(f"mixing must be a MixingParams, a dict or None, got {type(mixing).__name__}")


def to_wire(mixing: Any, stop_token_ids: list[int] | tuple[int, ...] = ()) -> dict:
    """Plain, msgpack-safe dict for ``extra_args["ngrpo"]``; raises ValueError on a value the engine cannot honour."""
    d = _as_dict(mixing)
    strategy = str(d.get("strategy", "neighbor_mix"))
    if strategy not in STRATEGIES_IN_ENGINE:
        raise ValueError(f"mixing.strategy={strategy!r} is not implemented inside the vLLM engine "
                         f"(supported: {STRATEGIES_IN_ENGINE})")
    rho = float(d.get("rho", 0.0) or 0.0)
    if strategy == "sample":
        rho = 0.0
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"mixing.rho must be in [0, 1], got {rho}")
    k = int(d.get("k", 3))
    if k < 1:
        raise ValueError(f"mixing.k must be >= 1, got {k}")
    tau = d.get("tau")
    if tau is not None and not float(tau) > 0:
        raise ValueError(f"mixing.tau must be > 0 or None, got {tau}")
    metric = str(d.get("metric", "cosine"))
    if metric not in METRICS:
        raise ValueError(f"mixing.metric must be one of {METRICS}, got {metric!r}")
    if d.get("alpha_source", "logits") != "logits":
        raise ValueError(f"mixing.alpha_source={d['alpha_source']!r} is not implemented in the engine hook "
                         f"(it computes alpha = softmax(logits[C] / tau), alpha_source='logits')")
    if d.get("emit", "anchor") != "anchor":
        raise ValueError(f"mixing.emit={d['emit']!r} is not implemented in the engine hook (it emits the anchor)")
    seed = d.get("seed")
    noise_std = float(d.get("noise_std", 0.0) or 0.0) if strategy == "gaussian_noise" else 0.0
    if noise_std < 0:
        raise ValueError(f"mixing.noise_std must be >= 0, got {noise_std}")
    return {
        "strategy": strategy, "rho": rho, "k": k, "tau": None if tau is None else float(tau), "metric": metric,
        "stop_after_ids": [int(x) for x in (d.get("stop_after_ids") or ())],
        "never_mix_ids": [int(x) for x in (d.get("never_mix_ids") or ())],
        "seed": None if seed is None else int(seed),
        "no_mix_anchor_ids": sorted({int(x) for x in stop_token_ids}),
        "noise_std": noise_std,
    }


def with_stream(wire: dict, purpose: int, call: int, index: int) -> dict:
    """A copy of a request's wire dict that names its gate stream (core.gate_stream)."""
    return {**wire, "stream": [int(purpose), int(call), int(index)]}


def from_wire(d: dict) -> RequestMixing:
    return RequestMixing(
        strategy=d["strategy"], rho=float(d["rho"]), k=int(d["k"]), tau=d.get("tau"), metric=d["metric"],
        stop_after_ids=tuple(d.get("stop_after_ids", ())), never_mix_ids=tuple(d.get("never_mix_ids", ())),
        seed=d.get("seed"), no_mix_anchor_ids=tuple(d.get("no_mix_anchor_ids", ())),
        noise_std=float(d.get("noise_std", 0.0)),
        **_stream_fields(d.get("stream")),
    )


def _stream_fields(stream: list | None) -> dict:
    if stream is None:
        return {}
    purpose, call, index = stream
    return {"stream_purpose": int(purpose), "stream_call": int(call), "stream_index": int(index)}
