"""Per-request mixing state in slots, the way vLLM keeps its sampling metadata: written when a request joins, read
by every step through a row -> slot map that changes only when the batch composition does.

Host columns (numpy, never read from the device): what the gate needs, i.e. the response's stream key
(core.gate_stream), its step (tokens emitted so far) and rho, plus the strategy and metric codes that split gated rows
into kernels. Device columns (tensors): what the kernels need, i.e. the temperature, tau, k, the index of the
request's "never mix" and "stop after" id sets in a stacked [n_sets, V + 1] bool table (column V: virtual ids, never
set), the stopped flag that the post-hook sets on device when the request emits a stop_after id, and the knobs of the
other kernels (record width, Gumbel temperature, Latent-GRPO's clamp / side / scale, emit "sampled", the
filtered-probability alpha with the request's top-k / top-p).

A request keeps its slot while vLLM keeps its cached state (``runner.requests``), so a preempted request keeps its
step count and stopped flag; slots are freed when a composition change finds the request gone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.core.mixing_spec import SOFT_STRATEGIES
from ngrpo_ray.engine.hook_batch import NEIGHBOR, NOISE, SOFT, to_device
from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY, METRICS, RequestMixing, from_wire

_NUMPY_DTYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}
NOISE_CODE = gate_stream.STRATEGY_CODES["gaussian_noise"]
SOFT_CODES = tuple(gate_stream.STRATEGY_CODES[s] for s in SOFT_STRATEGIES)


def kind_of(strategy_codes: np.ndarray) -> np.ndarray:
    """Host strategy codes -> kernel kinds (hook_batch.NEIGHBOR / SOFT / NOISE)."""
    return np.where(strategy_codes == NOISE_CODE, NOISE, np.where(np.isin(strategy_codes, SOFT_CODES), SOFT, NEIGHBOR))


# Host columns (numpy): name, dtype; new slots start at 0.
HOST_COLUMNS = (
    ("key", np.int64), ("step", np.int64), ("rho", np.float32), ("strategy", np.int8), ("metric", np.int8),
    ("noise_std", np.float32), ("has_stop", bool),
    ("width", np.int64),  # record width (k or top_k)
    ("filtered", bool),  # alpha_source "filtered_probs"
    ("filter_top_k", np.int64),  # the request's top-k (<= 0: off)
    ("filter_top_p", np.float32),
    # host copies of what lets a composition take the kernels' short paths (mixing_hook.Composition)
    ("mix_k", np.int64),  # neighbor_mix's k
    ("emits_sampled", bool),  # emit "sampled"
)
# Device columns: name, dtype, the value of a new slot until a request's options are written.
DEVICE_COLUMNS = (
    ("stopped", torch.bool, False), ("temp", torch.float32, 1.0), ("tau", torch.float32, 1.0),
    ("k", torch.int64, 1), ("ban_set", torch.int64, 0), ("stop_set", torch.int64, 0), ("width_t", torch.int64, 1),
    ("code_t", torch.int64, 0),  # strategy code
    ("gumbel_tau", torch.float32, 1.0), ("clamp_lo", torch.float32, 0.0), ("clamp_hi", torch.float32, 0.0),
    ("one_sided", torch.bool, False), ("noise_scale", torch.float32, 1.0), ("emit_sampled", torch.bool, False),
    ("filtered_t", torch.bool, False), ("top_k_t", torch.int64, 0), ("top_p_t", torch.float32, 1.0),
)


class RequestTable:
    def __init__(self, device: torch.device, vocab_size: int, k_max: int, default_seed: int, has_noise: bool,
                 capacity: int = 256):
        self.device, self.vocab_size, self.k_max = device, vocab_size, k_max
        self.default_seed, self.has_noise = int(default_seed), has_noise
        self.slot_of: dict[str, int] = {}
        self.options: dict[int, RequestMixing] = {}
        self.unmixed: set[str] = set()  # requests without mixing options (never looked at again)
        self._free: list[int] = []
        self._joined = 0  # requests numbered in join order when the driver gave no stream index
        self.capacity = 0
        for name, dtype in HOST_COLUMNS:
            setattr(self, name, np.zeros(0, dtype))
        for name, dtype, _ in DEVICE_COLUMNS:
            setattr(self, name, torch.zeros(0, dtype=dtype, device=device))
        self.id_sets = torch.zeros(1, vocab_size + 1, dtype=torch.bool, device=device)  # set 0: empty
        self._set_index: dict[tuple[int, ...], int] = {(): 0}
        self._grow(capacity)

    # ---- slots -------------------------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity
        pad = capacity - old
        for name, _ in HOST_COLUMNS:
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(pad, a.dtype)]))
        for name, dtype, fill in DEVICE_COLUMNS:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, torch.full((pad,), fill, dtype=dtype, device=self.device)]))
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def _id_set(self, ids: tuple[int, ...]) -> int:
        key = tuple(sorted({i for i in ids if 0 <= i < self.vocab_size}))
        index = self._set_index.get(key)
        if index is None:
            row = torch.zeros(1, self.vocab_size + 1, dtype=torch.bool, device=self.device)
            row[0, to_device(np.asarray(key, dtype=np.int64), self.device)] = True
            self.id_sets = torch.cat([self.id_sets, row])
            index = self._set_index[key] = len(self._set_index)
        return index

    def join(self, req_ids: list[str], requests: dict[str, Any]) -> None:
        """Give every new request of ``req_ids`` that carries mixing options a slot (one device write per column)."""
        new: list[tuple[int, RequestMixing, Any]] = []
        for rid in req_ids:
            if rid in self.slot_of or rid in self.unmixed:
                continue
            req = requests.get(rid)
            sp = getattr(req, "sampling_params", None)
            wire = (getattr(sp, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
            if wire is None:
                self.unmixed.add(rid)
                continue
            options = self._checked(from_wire(wire))
            temp = float(sp.temperature)
            if temp < 1e-5:
                raise ValueError("ngrpo mixing needs temperature > 0 (refused before the request runs; reached here "
                                 "only if a request bypassed the driver's checks)")
            if not self._free:
                self._grow(2 * self.capacity)
            slot = self._free.pop()
            self.slot_of[rid] = slot
            self.options[slot] = options
            new.append((slot, options, sp))
        if new:
            self._write(new)

    def _checked(self, options: RequestMixing) -> RequestMixing:
        if options.k > self.k_max or options.width > self.k_max:
            raise ValueError(f"mixing.k={options.k} / record width {options.width} exceeds the engine's "
                             f"k_max={self.k_max} (EngineSpec.k_max: the ring table's record width)")
        if options.strategy == "gaussian_noise" and not self.has_noise:
            raise ValueError("mixing.strategy='gaussian_noise' needs an engine built with a noise table "
                             "(EngineSpec.noise_table=True)")
        return options

    def _write(self, new: list[tuple[int, RequestMixing, Any]]) -> None:
        slots = [s for s, _, _ in new]
        for slot, o, _ in new:
            index = o.stream_index
            if index is None:
                index = self._joined
            self._joined += 1
            seed = self.default_seed if o.seed is None else o.seed
            self.key[slot] = gate_stream.stream_key(seed, o.strategy, o.stream_purpose, o.stream_call, index)
            self.step[slot] = 0
            self.rho[slot] = o.rho
            self.strategy[slot] = gate_stream.STRATEGY_CODES[o.strategy]
            self.metric[slot] = METRICS.index(o.metric)
            self.noise_std[slot] = o.noise_std
            self.has_stop[slot] = bool(o.stop_after_ids)
            self.width[slot] = o.width
            self.filtered[slot] = o.alpha_source == "filtered_probs" and o.strategy == "neighbor_mix"
            self.mix_k[slot] = o.k
            self.emits_sampled[slot] = o.emit == "sampled"
        temps = [float(sp.temperature) for _, _, sp in new]
        top_k = [int(sp.top_k or 0) if 0 < int(sp.top_k or 0) < self.vocab_size else 0 for _, _, sp in new]
        top_p = [float(sp.top_p) for _, _, sp in new]
        self.filter_top_k[slots] = top_k
        self.filter_top_p[slots] = top_p
        # Every value goes to the device by an asynchronous copy (pinned staging on CUDA): torch.tensor(values,
        # device=cuda) would be a blocking copy that waits for the queued forward at every join.
        def column(values, dtype):
            return to_device(np.asarray(values, dtype=_NUMPY_DTYPES[dtype]), self.device)

        idx = column(slots, torch.int64)

        self.stopped[idx] = False
        self.temp[idx] = column(temps, torch.float32)
        self.tau[idx] = column([o.tau if o.tau is not None else t for (_, o, _), t in zip(new, temps)], torch.float32)
        self.k[idx] = column([o.k for _, o, _ in new], torch.int64)
        self.ban_set[idx] = column(
            [self._id_set((*o.stop_after_ids, *o.never_mix_ids, *o.no_mix_anchor_ids)) for _, o, _ in new], torch.int64)
        self.stop_set[idx] = column([self._id_set(o.stop_after_ids) for _, o, _ in new], torch.int64)
        self.width_t[idx] = column([o.width for _, o, _ in new], torch.int64)
        self.code_t[idx] = column([gate_stream.STRATEGY_CODES[o.strategy] for _, o, _ in new], torch.int64)
        self.gumbel_tau[idx] = column([o.gumbel_tau for _, o, _ in new], torch.float32)
        self.clamp_lo[idx] = column([o.noise_clamp[0] for _, o, _ in new], torch.float32)
        self.clamp_hi[idx] = column([o.noise_clamp[1] for _, o, _ in new], torch.float32)
        self.one_sided[idx] = column([o.one_sided for _, o, _ in new], torch.bool)
        self.noise_scale[idx] = column([o.noise_scale for _, o, _ in new], torch.float32)
        self.emit_sampled[idx] = column([o.emit == "sampled" for _, o, _ in new], torch.bool)
        self.filtered_t[idx] = column(list(self.filtered[slots]), torch.bool)
        self.top_k_t[idx] = column(top_k, torch.int64)
        self.top_p_t[idx] = column(top_p, torch.float32)

    def release_gone(self, live: Any) -> None:
        """Free the slots of requests vLLM no longer holds (``live``: its ``runner.requests``)."""
        for rid in [r for r in self.slot_of if r not in live]:
            slot = self.slot_of.pop(rid)
            self.options.pop(slot, None)
            self._free.append(slot)
        self.unmixed = {r for r in self.unmixed if r in live}

    def __len__(self) -> int:
        return len(self.slot_of)
