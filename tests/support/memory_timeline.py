"""Peak bytes of the CPU tensors a call creates, from torch's profiler memory timeline (tensors that existed before
the call are not counted). For memory claims a test can check on CPU."""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action, MemoryProfileTimeline


def transient_peak_bytes(fn: Callable[[], object]) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    sizes: dict = {}
    for _, action, (key, _version), nbytes in sorted(MemoryProfileTimeline(prof._memory_profile()).timeline,
                                                   key=lambda e: e[0]):
        if action == Action.CREATE:
            live += nbytes
            sizes[key] = nbytes
        elif action == Action.DESTROY and key in sizes:
            live -= sizes.pop(key)
        peak = max(peak, live)
    return peak
