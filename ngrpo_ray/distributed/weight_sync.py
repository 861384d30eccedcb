"""Weight sync transport: trainer rank 0 -> every engine worker, bucketed and versioned, over a dedicated group.

Why a dedicated group: the trainers' default group (Ray Train / DeepSpeed) and each vLLM engine's own groups must
not be touched, and engines come and go independently of the trainers. So the sync builds its own
``TCPStore`` (hosted by trainer rank 0) and a torch backend object on it (``ProcessGroupGloo`` on CPU,
``ProcessGroupNCCL`` on GPU) without registering anything in ``torch.distributed``'s global state, which is what
vLLM's ``stateless_init_torch_distributed_process_group`` and the OpenRLHF / TRL stateless groups do. The same code
runs both backends; only the device of the buffers differs.

Wire protocol, all as broadcasts from rank 0 (so NCCL and gloo carry it alike):
  1. header  int64[3] = [payload_len, policy_version, n_buckets]
  2. payload uint8[payload_len] = pickled ``SyncPlan`` (names, shapes, dtypes, offsets per bucket)
  3. one flat broadcast per bucket (parameters of one dtype concatenated up to ``bucket_mb``).
Every wait has a deadline: a missing or dead peer raises ``WeightSyncTimeout`` instead of hanging.

This module imports no Ray and no vLLM: the engine-side mixin (``ngrpo_ray.engine.weight_receiver``) uses it too.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


class WeightSyncError(RuntimeError):
    """A weight sync failed (protocol mismatch, transport error)."""


class WeightSyncTimeout(WeightSyncError):
    """A peer did not join or did not answer within the sync timeout."""


@dataclass(frozen=True)
class SyncEndpoint:
    """Where and how to join a weight-sync group (picklable: the driver hands it to every participant)."""

    host: str
    port: int
    world_size: int  # 1 sender + every engine worker
    backend: str  # "gloo" or "nccl"
    timeout_s: float = 120.0


@dataclass(frozen=True)
class ParamSlot:
    name: str
    shape: tuple[int, ...]
    offset: int  # in elements, inside its bucket
    numel: int


@dataclass
class Bucket:
    dtype: torch.dtype
    slots: list[ParamSlot] = field(default_factory=list)
    numel: int = 0

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class SyncPlan:
    version: int
    buckets: list[Bucket]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)


@dataclass
class SyncStats:
    """What one sync cost; ``seconds`` is wall time on the calling side (gather + plan + all broadcasts)."""

    version: int
    bytes: int
    buckets: int
    seconds: float
    broadcast_seconds: float
    gather_seconds: float = 0.0
    load_seconds: float = 0.0

    def as_metrics(self, prefix: str = "sync/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items()}


def listening_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store, bound to a port the OS picks and held from then on: a port probed free and bound later can be
    taken in between by another process on a busy node ("address already in use")."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def choose_sync_backend(setting: str, use_gpu: bool) -> str:
    """cluster.sync_backend -> the group's backend: "auto" is NCCL on GPU runs and gloo on CPU; "gloo" on a GPU run
    sends through host memory (slower, but needs no NCCL between trainer and engines); "nccl" needs GPUs (refused at
    config time otherwise, config.load.validate)."""
    if setting == "auto":
        return "nccl" if use_gpu else "gloo"
    if setting not in ("gloo", "nccl"):
        raise ValueError(f"cluster.sync_backend must be 'auto', 'gloo' or 'nccl', got {setting!r}")
    if setting == "nccl" and not use_gpu:
        raise ValueError("cluster.sync_backend 'nccl' needs GPUs (trainer.use_gpu: true)")
    return setting


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


class WeightGroup:
    """One rank's handle on a dedicated broadcast group (rank 0 sends)."""

    def __init__(self, endpoint: SyncEndpoint, rank: int, device: torch.device | None = None,
                 store: dist.TCPStore | None = None):
        if not 0 <= rank < endpoint.world_size:
            raise ValueError(f"rank {rank} outside world_size {endpoint.world_size}")
        self.endpoint, self.rank = endpoint, rank
        self.timeout = timedelta(seconds=endpoint.timeout_s)
        if endpoint.backend == "nccl":
            self.device = device or torch.device("cuda", torch.cuda.current_device())
        elif endpoint.backend == "gloo":
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {endpoint.backend!r}")
        start = time.monotonic()
        try:
            # Only rank 0 listens (on the store it bound in listening_store, when given); the others connect. The
            # store is private to this group.
            self.store = store if store is not None else dist.TCPStore(
                endpoint.host, endpoint.port, endpoint.world_size, is_master=(rank == 0),
                timeout=self.timeout, wait_for_workers=False,
            )
            self.store.set_timeout(self.timeout)
            prefix = dist.PrefixStore(f"ngrpo_weight_sync/{endpoint.port}", self.store)
            self.pg = self._make_backend(prefix)
            if endpoint.backend == "gloo":
                # gloo connects lazily per pair; a barrier makes "join" mean "everyone is here".
                self._wait(self.pg.barrier(dist.BarrierOptions()), "joining the group")
        except WeightSyncTimeout:
            raise
        except Exception as exc:  # store/gloo raise plain RuntimeErrors on a missing peer
            waited = time.monotonic() - start
            raise WeightSyncTimeout(
                f"weight-sync group {endpoint.host}:{endpoint.port} ({endpoint.backend}, world {endpoint.world_size}) "
                f"rank {rank}: peers did not join within {endpoint.timeout_s:.1f}s (waited {waited:.1f}s): {exc}"
            ) from exc

    def _make_backend(self, store: dist.Store):
        ep = self.endpoint
        if ep.backend == "gloo":
            return dist.ProcessGroupGloo(store, self.rank, ep.world_size, self.timeout)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = self.timeout
        return dist.ProcessGroupNCCL(store, self.rank, ep.world_size, opts)

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:
            raise WeightSyncTimeout(
                f"weight sync rank {self.rank}: {what} failed or timed out after {self.endpoint.timeout_s:.1f}s "
                f"(a peer is dead or absent?): {exc}"
            ) from exc
        if ok is False:
            raise WeightSyncTimeout(f"weight sync rank {self.rank}: {what} timed out after {self.endpoint.timeout_s:.1f}s")

    def broadcast(self, tensor: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._wait(self.pg.broadcast([tensor], opts), what)
        return tensor

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.shutdown()
        self.pg = None
        self.store = None


# ----------------------------------------------------------------------------------------------------- planning


def plan_buckets(specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]], bucket_mb: float, version: int) -> SyncPlan:
    """Greedy, order-preserving packing of (name, shape, dtype) into per-dtype buckets of at most ``bucket_mb``.

    A parameter larger than a bucket gets a bucket of its own (never split: the receiver loads whole tensors).
    """
    limit = max(1, int(bucket_mb * 2**20))
    buckets: list[Bucket] = []
    open_by_dtype: dict[torch.dtype, Bucket] = {}
    for name, shape, dtype in specs:
        numel = 1
        for s in shape:
            numel *= int(s)
        esize = torch.empty((), dtype=dtype).element_size()
        b = open_by_dtype.get(dtype)
        if b is None or (b.numel + numel) * esize > limit and b.numel > 0:
            b = Bucket(dtype=dtype)
            buckets.append(b)
            open_by_dtype[dtype] = b
        b.slots.append(ParamSlot(name, tuple(int(s) for s in shape), b.numel, numel))
        b.numel += numel
    return SyncPlan(version=version, buckets=buckets)


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # ZeRO-3 partitions keep ds_shape


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor], zero3: bool):
    if not zero3:
        yield
        return
    import deepspeed  # only the ZeRO-3 path needs it

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


# -------------------------------------------------------------------------------------------------- send / receive


def send_weights(
    group: WeightGroup | None,
    module: torch.nn.Module,
    version: int,
    bucket_mb: float = 64.0,
    send_dtype: torch.dtype | None = None,
    zero3: bool = False,
) -> SyncStats:
    """Broadcast ``module``'s parameters with ``version``. Call on every trainer rank when ``zero3`` (they all take
    part in the gathers); only the rank holding ``group`` (trainer rank 0) sends, the others pass ``group=None``."""
    start = time.monotonic()
    named = list(module.named_parameters())
    by_name = dict(named)
    plan = plan_buckets(((n, _full_shape(p), send_dtype or p.dtype) for n, p in named), bucket_mb, version)
    bcast_s = gather_s = 0.0
    if group is not None:
        payload = torch.frombuffer(bytearray(pickle.dumps(plan)), dtype=torch.uint8)
        header = torch.tensor([payload.numel(), version, len(plan.buckets)], dtype=torch.int64)
        t0 = time.monotonic()
        group.broadcast(header.to(group.device), "sending the sync header")
        group.broadcast(payload.to(group.device), "sending the sync plan")
        bcast_s += time.monotonic() - t0
    for bucket in plan.buckets:
        params = [by_name[s.name] for s in bucket.slots]
        t0 = time.monotonic()
        with _gathered(params, zero3):
            gather_s += time.monotonic() - t0
            if group is None:
                continue
            flat = torch.cat([p.detach().reshape(-1).to(device=group.device, dtype=bucket.dtype) for p in params])
            t0 = time.monotonic()
            group.broadcast(flat, f"broadcasting bucket of {bucket.nbytes} bytes")
            bcast_s += time.monotonic() - t0
    return SyncStats(version, plan.nbytes if group is not None else 0, len(plan.buckets),
                     time.monotonic() - start, bcast_s, gather_s)


def receive_weights(group: WeightGroup) -> tuple[SyncPlan, list[tuple[str, torch.Tensor]], SyncStats]:
    """Receive one versioned sync; returns the plan, (name, tensor) views into the received buckets, and stats."""
    start = time.monotonic()
    header = group.broadcast(torch.zeros(3, dtype=torch.int64, device=group.device), "waiting for the sync header")
    length, version, n_buckets = (int(x) for x in header.cpu())
    payload = group.broadcast(torch.empty(length, dtype=torch.uint8, device=group.device), "receiving the sync plan")
    plan: SyncPlan = pickle.loads(payload.cpu().numpy().tobytes())
    if plan.version != version or len(plan.buckets) != n_buckets:
        raise WeightSyncError(f"sync header (v{version}, {n_buckets} buckets) disagrees with its plan "
                              f"(v{plan.version}, {len(plan.buckets)} buckets)")
    named: list[tuple[str, torch.Tensor]] = []
    for i, bucket in enumerate(plan.buckets):
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=group.device)
        group.broadcast(flat, f"receiving bucket {i + 1}/{n_buckets}")
        named.extend((s.name, flat[s.offset: s.offset + s.numel].view(s.shape)) for s in bucket.slots)
    seconds = time.monotonic() - start
    return plan, named, SyncStats(version, plan.nbytes, n_buckets, seconds, seconds)


def raw_broadcast_seconds(group: WeightGroup, nbytes: int, chunk_mb: float | None = None) -> float:
    """Time a plain broadcast of ``nbytes`` (one tensor, or chunks of ``chunk_mb``) on the same group: the floor the
    bucketed sync is compared against. Every rank of the group must call it with the same arguments."""
    chunk = nbytes if not chunk_mb else max(1, int(chunk_mb * 2**20))
    bufs = [torch.ones(min(chunk, nbytes - o), dtype=torch.uint8, device=group.device) for o in range(0, nbytes, chunk)]
    group.broadcast(torch.zeros(1, dtype=torch.uint8, device=group.device), "raw broadcast warm-up")
    start = time.monotonic()
    for b in bufs:
        group.broadcast(b, "raw broadcast")
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    return time.monotonic() - start


def iter_named(named: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    yield from named
