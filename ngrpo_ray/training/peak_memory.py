"""The peak memory of one phase of a trainer rank (the update, the weight sync), logged beside the memory plan's figure.

On a GPU, torch's caching allocator since the phase began: the peak of allocated bytes (live tensors, what the plan's
terms count) and of reserved bytes (what the process took from the device: allocated plus cached blocks, fragments
included; what the colocated engine cannot have). On a CPU, the process's resident high-water mark (Linux's VmHWM,
reset at the phase's start by writing 5 to /proc/self/clear_refs): every page the process touched, Python and its
libraries included, comparable across iterations but not to a GPU plan.

On a GPU also the device's used memory when the phase begins, every process's (CUDA's free/total): in a colocated
update that is this rank's resident state beside what the sleeping engine kept, the plan's "asleep" term.

Metric names: ``memory/<phase>_peak_allocated_gib``, ``memory/<phase>_peak_reserved_gib`` and
``memory/<phase>_device_used_at_start_gib`` (CUDA), or ``memory/<phase>_peak_resident_gib`` (CPU). Ranks differ
(rank 0 sends the weights); the trainer group logs the largest (``max_over_ranks``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

GIB = float(1 << 30)
PREFIX = "memory/"
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def resident_peak_bytes() -> int | None:
    """This process's resident high-water mark (VmHWM), or None where /proc has none (not Linux)."""
    try:
        with open(_STATUS) as f:
            found = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def reset_resident_peak() -> bool:
    """Set VmHWM to the current resident size (clear_refs 5 touches only that counter, no page flags)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PhasePeak:
    """``with PhasePeak(device, "update") as peak: ...`` then ``peak.metrics()``."""

    def __init__(self, device: torch.device | str, phase: str):
        self.device, self.phase = torch.device(device), phase
        self.cuda = self.device.type == "cuda"
        self._measured: dict[str, float] = {}
        self._resettable = False

    def __enter__(self) -> "PhasePeak":
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            self._device_used_at_start = (total - free) / GIB
        else:
            self._resettable = reset_resident_peak()
        return self

    def __exit__(self, *exc) -> None:
        name = PREFIX + self.phase + "_peak_"
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._measured = {name + "allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                              name + "reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB,
                              f"{PREFIX}{self.phase}_device_used_at_start_gib": self._device_used_at_start}
        elif self._resettable and (peak := resident_peak_bytes()) is not None:
            self._measured = {name + "resident_gib": peak / GIB}

    def metrics(self) -> dict[str, float]:
        return dict(self._measured)


def max_over_ranks(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's result with every ``memory/`` figure replaced by the largest any rank reported."""
    merged = dict(results[0])
    for result in results[1:]:
        for key, value in result.items():
            if key.startswith(PREFIX):
                merged[key] = max(value, merged.get(key, value))
    return merged
