"""training.peak_memory: a phase's peak, measured against allocations of known size, and the merge over ranks."""

import pytest
import torch

from ngrpo_ray.training.peak_memory import GIB, PhasePeak, max_over_ranks, resident_peak_bytes

MIB = 1 << 20


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(resident_peak_bytes() is None, reason="no /proc/self/status (not Linux)")
def test_cpu_phase_peak_is_the_phase_high_water_mark():
    big = torch.ones(512 * MIB, dtype=torch.uint8)  # an earlier, larger peak: the reset must forget it
    del big
    before = _resident_bytes()
    with PhasePeak("cpu", "update") as peak:
        block = torch.ones(256 * MIB, dtype=torch.uint8)  # touched: 256 MiB resident
        del block
    grown = peak.metrics()["memory/update_peak_resident_gib"] * GIB - before
    assert abs(grown - 256 * MIB) < 8 * MIB, grown / MIB  # the block, give or take the allocator's pages
    with PhasePeak("cpu", "sync") as quiet:  # nothing allocated: the peak is where the process stands
        pass
    assert quiet.metrics()["memory/sync_peak_resident_gib"] * GIB - before < 16 * MIB


def test_max_over_ranks_keeps_rank_0_and_the_largest_memory():
    ranks = [{"loss": 0.5, "memory/update_peak_allocated_gib": 3.0, "engines": [1]},
             {"loss": 0.5, "memory/update_peak_allocated_gib": 4.5, "memory/sync_peak_allocated_gib": 1.0},
             {"loss": 0.7, "memory/update_peak_allocated_gib": 2.0}]
    assert max_over_ranks(ranks) == {"loss": 0.5, "memory/update_peak_allocated_gib": 4.5, "engines": [1],
                                     "memory/sync_peak_allocated_gib": 1.0}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_phase_peak_counts_the_allocator():
    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.empty_cache()
    before, reserved_before = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    with PhasePeak(device, "update") as peak:
        block = torch.empty(1 << 30, dtype=torch.uint8, device=device)  # 1 GiB: the allocator rounds to 512 B
        del block
    m = peak.metrics()
    assert m["memory/update_peak_allocated_gib"] * GIB - before == GIB
    assert m["memory/update_peak_reserved_gib"] >= m["memory/update_peak_allocated_gib"]
    # the device's used memory at the start: at least what this process had reserved then (the CUDA context too)
    assert m["memory/update_device_used_at_start_gib"] * GIB >= reserved_before
