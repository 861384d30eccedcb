"""FAKE GPU pieces for CPU machines, shared by the fakes of CUDA IPC (fake_cuda_ipc.py) and NCCL (fake_nccl.py): the
``torch`` that vLLM's weight-transfer modules see (real torch, but for its ``cuda`` and ``accelerator``) and this
process's fake GPU. ``install_in_this_process`` is Ray's ``worker_process_setup_hook`` for a test cluster: every
worker gets both fakes."""

from __future__ import annotations

import contextlib
import os
import types

import torch

GPU_ENV = "NGRPO_FAKE_GPU_UUID"


def fake_gpu_uuid() -> str:
    """This process's fake GPU: $NGRPO_FAKE_GPU_UUID (set by a test for an engine), else one per trainer rank (Ray
    Train sets RANK), as on a colocated node where rank r and engine r share GPU r."""
    return os.environ.get(GPU_ENV) or f"GPU-fake-{os.environ.get('RANK', '0')}"


def fake_torch(empty=None) -> types.ModuleType:
    """Streams and syncs are no-ops (CPU copies are synchronous); the device is index 0 of this process's fake GPU.
    ``empty``: a replacement for ``torch.empty`` (the CUDA IPC fake's shared buffers)."""
    fake = types.ModuleType("torch")
    fake.__dict__.update(torch.__dict__)
    stream = types.SimpleNamespace(synchronize=lambda: None)
    fake.cuda = types.SimpleNamespace(
        get_device_properties=lambda index=None: types.SimpleNamespace(uuid=fake_gpu_uuid()),
        Stream=lambda *a, **k: stream, stream=lambda s: contextlib.nullcontext(),
        current_stream=lambda *a, **k: stream, synchronize=lambda *a, **k: None, ipc_collect=lambda: None,
        is_available=lambda: False)
    fake.accelerator = types.SimpleNamespace(current_device_index=lambda: 0)
    if empty is not None:
        fake.empty = empty
    return fake


def install(which: str) -> None:
    """"ipc" or "nccl" (plain setattr: for a worker process, which is not reused outside the test)."""
    from tests.support import fake_nccl
    from tests.support.fake_cuda_ipc import FakeCudaIpc

    if which == "ipc":
        FakeCudaIpc().install()
    else:
        fake_nccl.install()


def install_in_this_process() -> None:
    install("ipc")
    install("nccl")  # keeps the ipc fake's torch (with its shared buffers) in vLLM's packing module
