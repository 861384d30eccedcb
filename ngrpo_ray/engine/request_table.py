"""Per-request mixing state in slots, the way vLLM keeps its sampling metadata: written when a request joins, read
by every step through a row -> slot map that changes only when the batch composition does.

Host columns (numpy, never read from the device): what the gate needs, i.e. the response's stream key
(core.gate_stream), its step (tokens emitted so far) and rho, plus the strategy and metric codes that split gated rows
into kernels. Device columns (tensors): what the kernels need, i.e. the temperature, tau, k, the index of the
request's "never mix" and "stop after" id sets in a stacked [n_sets, V + 1] bool table (column V: virtual ids, never
set), and the stopped flag that the post-hook sets on device when the request emits a stop_after id.

A request keeps its slot while vLLM keeps its cached state (``runner.requests``), so a preempted request keeps its
step count and stopped flag; slots are freed when a composition change finds the request gone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ngrpo_ray.core import gate_stream
from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY, METRICS, RequestMixing, from_wire

NOISE_CODE = gate_stream.STRATEGY_CODES["gaussian_noise"]


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
        # host columns
        self.key = np.zeros(0, np.int64)
        self.step = np.zeros(0, np.int64)
        self.rho = np.zeros(0, np.float32)
        self.strategy = np.zeros(0, np.int8)
        self.metric = np.zeros(0, np.int8)
        self.noise_std = np.zeros(0, np.float32)
        self.has_stop = np.zeros(0, bool)
        # device columns
        self.stopped = torch.zeros(0, dtype=torch.bool, device=device)
        self.temp = torch.ones(0, dtype=torch.float32, device=device)
        self.tau = torch.ones(0, dtype=torch.float32, device=device)
        self.k = torch.ones(0, dtype=torch.int64, device=device)
        self.ban_set = torch.zeros(0, dtype=torch.int64, device=device)
        self.stop_set = torch.zeros(0, dtype=torch.int64, device=device)
        self.id_sets = torch.zeros(1, vocab_size + 1, dtype=torch.bool, device=device)  # set 0: empty
        self._set_index: dict[tuple[int, ...], int] = {(): 0}
        self._grow(capacity)

    # ---- slots -------------------------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        old = self.capacity
        pad = capacity - old
        for name in ("key", "step", "rho", "strategy", "metric", "noise_std", "has_stop"):
            a = getattr(self, name)
            setattr(self, name, np.concatenate([a, np.zeros(pad, a.dtype)]))
        for name, fill in (("stopped", False), ("temp", 1.0), ("tau", 1.0), ("k", 1), ("ban_set", 0),
                           ("stop_set", 0)):
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, torch.full((pad,), fill, dtype=t.dtype, device=self.device)]))
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    def _id_set(self, ids: tuple[int, ...]) -> int:
        key = tuple(sorted({i for i in ids if 0 <= i < self.vocab_size}))
        index = self._set_index.get(key)
        if index is None:
            row = torch.zeros(1, self.vocab_size + 1, dtype=torch.bool, device=self.device)
            row[0, torch.tensor(key, dtype=torch.long, device=self.device)] = True
            self.id_sets = torch.cat([self.id_sets, row])
            index = self._set_index[key] = len(self._set_index)
        return index

    def join(self, req_ids: list[str], requests: dict[str, Any]) -> None:
        """Give every new request of ``req_ids`` that carries mixing options a slot (one device write per column)."""
        new: list[tuple[int, RequestMixing, float]] = []
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
            new.append((slot, options, temp))
        if new:
            self._write(new)

    def _checked(self, options: RequestMixing) -> RequestMixing:
        if options.k > self.k_max:
            raise ValueError(f"mixing.k={options.k} exceeds the engine's k_max={self.k_max}")
        if options.strategy == "gaussian_noise" and not self.has_noise:
            raise ValueError("mixing.strategy='gaussian_noise' needs an engine built with a noise table "
                             "(EngineSpec.noise_table=True)")
        return options

    def _write(self, new: list[tuple[int, RequestMixing, float]]) -> None:
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
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        dev = dict(device=self.device)
        self.stopped[idx] = False
        self.temp[idx] = torch.tensor([t for _, _, t in new], dtype=torch.float32, **dev)
        self.tau[idx] = torch.tensor([o.tau if o.tau is not None else t for _, o, t in new], dtype=torch.float32,
                                     **dev)
        self.k[idx] = torch.tensor([o.k for _, o, _ in new], dtype=torch.int64, **dev)
        self.ban_set[idx] = torch.tensor(
            [self._id_set((*o.stop_after_ids, *o.never_mix_ids, *o.no_mix_anchor_ids)) for _, o, _ in new], **dev)
        self.stop_set[idx] = torch.tensor([self._id_set(o.stop_after_ids) for _, o, _ in new], **dev)

    def release_gone(self, live: Any) -> None:
        """Free the slots of requests vLLM no longer holds (``live``: its ``runner.requests``)."""
        for rid in [r for r in self.slot_of if r not in live]:
            slot = self.slot_of.pop(rid)
            self.options.pop(slot, None)
            self._free.append(slot)
        self.unmixed = {r for r in self.unmixed if r in live}

    def __len__(self) -> int:
        return len(self.slot_of)
