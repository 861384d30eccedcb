"""The trainer's end of vLLM's weight-transfer API: its parameters as a ``WeightSource`` and the trainer-side engine
for the chosen backend (vLLM's ``nccl`` / ``ipc``, or this project's ``ngrpo_gloo``).

Imports vLLM: it runs in the trainer workers, which have it installed (vLLM's trainer engines live there too).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerWeightTransferEngine, WeightSource

from ngrpo_ray.distributed.weight_sync import GLOO_BACKEND, free_port, gathered
from ngrpo_ray.engine.gloo_transfer import GlooTrainerInitInfo, register_gloo_backend


class TrainerWeightSource(WeightSource):
    """The DeepSpeed module's parameters (tied ones once, as ``named_parameters`` lists them) in the training dtype
    (the engine's loaders cast if its dtype differs). Under ZeRO-3 each parameter is gathered while it is read, so
    the yielded tensor is ``transient``: a sender must be done with it before it asks for the next.

    The gathers are collectives of every trainer rank, so a sender that stopped early (an engine died mid-sync) must
    still run the rest of them, or the other ranks wait in a gather for good: ``begin`` before a sync, and ``finish``
    after a failed one runs the pass to its end without sending."""

    def __init__(self, module: torch.nn.Module, zero3: bool = False):
        self.module, self.zero3 = module, zero3
        self.transient = zero3
        self._pass: Iterator[tuple[str, torch.Tensor]] | None = None  # this sync's pass, kept to finish it

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, p.dtype, tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape))
                for n, p in self.module.named_parameters()]

    def begin(self) -> None:
        self._pass = None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._pass = self._parameters()
        return self._pass

    def finish(self) -> int:
        """Run what is left of this sync's pass (all of it if the sender never started); returns how many parameters
        that was."""
        rest = self._pass if self._pass is not None else self._parameters()
        self._pass = None
        return sum(1 for _ in rest)

    def _parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.module.named_parameters():
            with gathered([p], self.zero3), torch.no_grad():
                yield name, p.detach()


def open_trainer_engine(backend: str, *, rank: int, host: str, world_size: int, timeout_s: float, bucket_bytes: int,
                        client, source: WeightSource, shared_memory: bool = True) -> TrainerWeightTransferEngine:
    """vLLM's ``WeightTransferTrainerFactory.trainer_init`` for ``backend``; on rank 0 it also makes every engine
    join (``client.init_weight_transfer_engine``). Packed buckets of ``bucket_bytes`` (cluster.sync_bucket_mb).
    ``shared_memory`` (ngrpo_gloo only): offer the receivers on this host a shared segment; off, bytes go by gloo."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    register_gloo_backend()
    if backend == GLOO_BACKEND:
        info = GlooTrainerInitInfo(host=host, world_size=world_size, timeout_s=timeout_s, bucket_bytes=bucket_bytes,
                                   rank=rank, shared_memory=shared_memory)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(master_address=host, master_port=free_port(host), world_size=world_size,
                                   packed=True, packed_buffer_size_bytes=bucket_bytes, rank=rank)
    elif backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        # its one reusable buffer must hold the largest tensor (packed_ipc_producer refuses a bigger one): a real
        # embedding (Qwen2.5-1.5B's: 467 MB in bf16) is far above the default bucket
        largest = max((math.prod(m.shape) * m.dtype.itemsize for m in source.metadata()), default=0)
        info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=max(bucket_bytes, largest), rank=rank)
    else:
        raise ValueError(f"unknown weight-transfer backend {backend!r} (ngrpo_gloo, nccl or ipc)")
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
