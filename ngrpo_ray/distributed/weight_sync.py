"""Weight sync pieces that import neither Ray nor vLLM: the backend choice, the gloo group with deadlines, and the
message layout of this project's CPU backend for vLLM's weight-transfer API (``ngrpo_ray.engine.gloo_transfer``).

The transport itself goes through ``vllm.distributed.weight_transfer``: trainer rank 0 holds a
``TrainerWeightTransferEngine`` (vLLM's ``nccl`` / ``ipc``, or ours, ``ngrpo_gloo``) and drives every engine's
``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` through a
client (``ngrpo_ray.distributed.weight_client``). This module holds what both ends of ``ngrpo_gloo`` agree on.

Why a dedicated gloo group: the trainers' default group (Ray Train / DeepSpeed) and each vLLM engine's own groups
must not be touched, and engines come and go independently of the trainers. So the sync builds its own ``TCPStore``
(hosted by trainer rank 0) and a ``ProcessGroupGloo`` on it without registering anything in ``torch.distributed``'s
global state. Every wait has a deadline: a missing or dead peer raises ``WeightSyncTimeout`` instead of hanging.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

from ngrpo_ray.distributed.placement import weight_transport

GLOO_BACKEND = "ngrpo_gloo"  # our CPU backend's name in vLLM's weight-transfer registries
DIRECT_MIN_BYTES = 1 << 20  # tensors at least this big travel alone, straight from (and into) their own memory


class WeightSyncError(RuntimeError):
    """A weight sync failed (protocol mismatch, transport error)."""


class WeightSyncTimeout(WeightSyncError):
    """A peer did not join or did not answer within the sync timeout."""


def listening_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store, bound to a port the OS picks and held from then on: a port probed free and bound later can be
    taken in between by another process on a busy node ("address already in use")."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def choose_sync_backend(setting: str, use_gpu: bool, same_gpu: bool = False) -> str:
    """cluster.sync_backend -> the vLLM weight-transfer backend: "auto" is ``nccl`` on GPU runs (``ipc`` when every
    engine sits on a trainer rank's GPU, ``same_gpu``: the colocated layout) and ours, ``ngrpo_gloo``, on CPU; "gloo"
    on a GPU run sends through host memory (slower, but needs no NCCL between trainer and engines); "nccl" needs GPUs
    (refused at config time otherwise, config.load.validate)."""
    if setting not in ("auto", "gloo", "nccl"):
        raise ValueError(f"cluster.sync_backend must be 'auto', 'gloo' or 'nccl', got {setting!r}")
    if setting == "nccl" and not use_gpu:
        raise ValueError("cluster.sync_backend 'nccl' needs GPUs (trainer.use_gpu: true)")
    transport = weight_transport(setting, use_gpu, same_gpu)
    return GLOO_BACKEND if transport == "gloo" else transport


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_ip() -> str:
    """An address the other nodes can reach this one at (loopback when alone)."""
    try:
        import ray  # optional: only for its resolution of the node address

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # pragma: no cover - ray missing or not in a worker
        pass
    return "127.0.0.1"


@dataclass(frozen=True)
class SyncEndpoint:
    """Where and how to join a gloo weight-sync group (plain fields: it travels inside vLLM's init_info dict)."""

    host: str
    port: int
    world_size: int  # 1 sender + every engine worker
    timeout_s: float = 120.0


class WeightGroup:
    """One rank's handle on a dedicated gloo broadcast group (rank 0 sends)."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, store: dist.TCPStore | None = None):
        if not 0 <= rank < endpoint.world_size:
            raise ValueError(f"rank {rank} outside world_size {endpoint.world_size}")
        self.endpoint, self.rank = endpoint, rank
        self.timeout = timedelta(seconds=endpoint.timeout_s)
        start = time.monotonic()
        try:
            # Only rank 0 listens (on the store it bound in listening_store, when given); the others connect.
            self.store = store if store is not None else dist.TCPStore(
                endpoint.host, endpoint.port, endpoint.world_size, is_master=(rank == 0),
                timeout=self.timeout, wait_for_workers=False,
            )
            self.store.set_timeout(self.timeout)
            prefix = dist.PrefixStore(f"ngrpo_weight_sync/{endpoint.port}", self.store)
            self.pg = dist.ProcessGroupGloo(prefix, rank, endpoint.world_size, self.timeout)
            # gloo connects lazily per pair; a barrier makes "join" mean "everyone is here".
            self.wait(self.pg.barrier(dist.BarrierOptions()), "joining the group")
        except WeightSyncTimeout:
            raise
        except Exception as exc:  # store/gloo raise plain RuntimeErrors on a missing peer
            waited = time.monotonic() - start
            raise WeightSyncTimeout(
                f"weight-sync group {endpoint.host}:{endpoint.port} (gloo, world {endpoint.world_size}) rank {rank}: "
                f"peers did not join within {endpoint.timeout_s:.1f}s (waited {waited:.1f}s): {exc}"
            ) from exc

    def wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:
            raise WeightSyncTimeout(
                f"weight sync rank {self.rank}: {what} failed or timed out after {self.endpoint.timeout_s:.1f}s "
                f"(a peer is dead or absent?): {exc}"
            ) from exc
        if ok is False:
            raise WeightSyncTimeout(f"weight sync rank {self.rank}: {what} timed out after {self.endpoint.timeout_s:.1f}s")

    def start_broadcast(self, tensor: torch.Tensor):
        """Post a broadcast from rank 0 without waiting (gloo runs it on its own thread); pair with ``wait``."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        return self.pg.broadcast([tensor], opts)

    def broadcast(self, tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        self.wait(self.start_broadcast(tensor), what)
        return tensor

    def all_agree(self, flag: bool, what: str) -> bool:
        """True on every rank if ``flag`` is true on every rank (a collective: all ranks call it)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.wait(self.pg.allreduce([t], opts), what)
        return bool(t.item())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.shutdown()
        self.pg = None
        self.store = None


# ------------------------------------------------------------------------------------------------ message layout


@dataclass(frozen=True)
class Message:
    """One broadcast of ``ngrpo_gloo``: either one big tensor sent from its own memory (``direct``), or small tensors
    packed into one byte buffer. ``items`` index the update's parameter list; ``offsets`` are byte offsets."""

    items: tuple[int, ...]
    offsets: tuple[int, ...]
    nbytes: int
    direct: bool


def plan_messages(nbytes: Sequence[int], bucket_bytes: int, direct_min_bytes: int = DIRECT_MIN_BYTES) -> list[Message]:
    """The broadcasts of one update, computed alike on the sender and on every receiver from the parameter sizes.

    Big tensors go alone, in order, with no copy on the sender (the packing copy was a large part of the old
    protocol's overhead); the small ones (norms, biases) are packed, in order, into buffers of at most
    ``bucket_bytes`` sent after the big ones, so a handful of broadcasts carry them instead of one each."""
    messages: list[Message] = []
    small: list[int] = []
    for i, n in enumerate(nbytes):
        if n >= direct_min_bytes:
            messages.append(Message((i,), (0,), int(n), True))
        else:
            small.append(i)
    items: list[int] = []
    offsets: list[int] = []
    size = 0
    for i in small:
        if items and size + int(nbytes[i]) > bucket_bytes:
            messages.append(Message(tuple(items), tuple(offsets), size, False))
            items, offsets, size = [], [], 0
        items.append(i)
        offsets.append(size)
        size += -(-int(nbytes[i]) // 64) * 64  # aligned: every packed tensor is a valid view of its dtype
    if items:
        messages.append(Message(tuple(items), tuple(offsets), size, False))
    return messages


def plan_segment(nbytes: Sequence[int], chunk_bytes: int) -> list[Message]:
    """The layout of one update in a shared segment, alike on the sender and on every receiver: every tensor in
    source order at a 64-byte aligned offset of the segment (``offsets`` are absolute), grouped into chunks of at
    least ``chunk_bytes`` (the last may be smaller). The sender signals each chunk once it is written, so the
    receivers load chunk k while chunk k+1 is being written."""
    chunks: list[Message] = []
    items: list[int] = []
    offsets: list[int] = []
    start = end = 0
    for i, n in enumerate(nbytes):
        items.append(i)
        offsets.append(end)
        end += -(-int(n) // 64) * 64
        if end - start >= chunk_bytes or i == len(nbytes) - 1:
            chunks.append(Message(tuple(items), tuple(offsets), end - start, False))
            items, offsets, start = [], [], end
    return chunks


def segment_bytes(chunks: Sequence[Message]) -> int:
    return sum(c.nbytes for c in chunks)


def raw_broadcast_seconds(group: WeightGroup, nbytes: int, chunk_mb: float | None = None) -> float:
    """Time a plain broadcast of ``nbytes`` (one tensor, or chunks of ``chunk_mb``) on the same group: the floor the
    sync is compared against. Every rank of the group must call it with the same arguments."""
    chunk = nbytes if not chunk_mb else max(1, int(chunk_mb * 2**20))
    bufs = [torch.ones(min(chunk, nbytes - o), dtype=torch.uint8) for o in range(0, nbytes, chunk)]
    group.broadcast(torch.zeros(1, dtype=torch.uint8), "raw broadcast warm-up")
    start = time.monotonic()
    for b in bufs:
        group.broadcast(b, "raw broadcast")
    return time.monotonic() - start


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], zero3: bool):
    """ZeRO-3 partitions gathered for the duration (a collective: every trainer rank enters it in the same order)."""
    if not zero3:
        yield
        return
    import deepspeed  # only the ZeRO-3 path needs it

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
