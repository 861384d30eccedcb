"""Weight sync over gloo between a sender process and receiver processes, and the timeout on a dead peer."""

from __future__ import annotations

import io
import multiprocessing as mp
import time

import pytest
import torch

from ngrpo_ray.distributed.weight_sync import (
    SyncEndpoint,
    WeightGroup,
    WeightSyncTimeout,
    free_port,
    plan_buckets,
    raw_broadcast_seconds,
    send_weights,
)
from ngrpo_ray.engine.weight_receiver import WeightReceiverMixin


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 7))
    m.extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))  # a second dtype -> a second bucket family
    return m


class PlainReceiver(WeightReceiverMixin):
    """A plain torch model standing in for the vLLM worker."""

    def __init__(self, rank: int):
        self.rank = 0  # TP rank inside the "engine"; the offset places it in the group
        self.model = _model(seed=100 + rank)
        self.rebuilt = 0

    def ngrpo_load_weights(self, named):
        missing = self.model.load_state_dict(dict(named), strict=True)
        assert not missing.missing_keys
        self.ngrpo_after_weights_changed()

    def ngrpo_after_weights_changed(self):
        self.rebuilt += 1


def _receiver_main(endpoint: SyncEndpoint, rank: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    r = PlainReceiver(rank)
    res = r.ngrpo_init_weight_group(endpoint.__dict__, rank_offset=rank)
    assert res["ok"], res
    res = r.ngrpo_receive_weights()
    raw = r.ngrpo_raw_broadcast(res.get("bytes", 0)) if res["ok"] else {}
    # Tensors through an mp.Queue travel as shared-memory handles that die with this process; send bytes instead.
    buf = io.BytesIO()
    torch.save(r.model.state_dict(), buf)
    out.put({"res": res, "raw": raw, "version": r.ngrpo_policy_version(), "rebuilt": r.rebuilt,
             "state": buf.getvalue()})
    r.ngrpo_close_weight_group()


def test_plan_buckets_packs_by_dtype_and_size():
    specs = [("a", (256,), torch.float32), ("b", (256,), torch.float32), ("c", (10,), torch.bfloat16),
             ("d", (1024,), torch.float32), ("e", (1,), torch.float32)]
    plan = plan_buckets(specs, bucket_mb=2048 / 2**20, version=7)  # 2 KiB buckets
    layout = [(b.dtype, [s.name for s in b.slots], b.numel) for b in plan.buckets]
    # a+b = 2048 bytes fill one bucket; d (4096 bytes) is too large and gets its own; e opens a new one after d
    assert layout == [(torch.float32, ["a", "b"], 512), (torch.bfloat16, ["c"], 10),
                      (torch.float32, ["d"], 1024), (torch.float32, ["e"], 1)]
    assert plan.nbytes == 4 * (512 + 1024 + 1) + 2 * 10
    assert [s.offset for s in plan.buckets[0].slots] == [0, 256]


def test_gloo_sync_to_two_receivers_is_exact_and_versioned():
    ctx = mp.get_context("spawn")
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=3, backend="gloo", timeout_s=60)
    out = ctx.Queue()
    procs = [ctx.Process(target=_receiver_main, args=(endpoint, rank, out)) for rank in (1, 2)]
    for p in procs:
        p.start()
    try:
        sender_model = _model(seed=0)
        group = WeightGroup(endpoint, rank=0)
        stats = send_weights(group, sender_model, version=5, bucket_mb=0.002)  # ~2 KiB: several buckets
        raw_s = raw_broadcast_seconds(group, stats.bytes)
        results = [out.get(timeout=60) for _ in procs]
        group.close()
    finally:
        for p in procs:
            p.join(timeout=30)
    n_bytes = sum(p.numel() * p.element_size() for p in sender_model.parameters())
    assert stats.bytes == n_bytes and stats.buckets >= 4 and stats.version == 5
    assert raw_s > 0
    for r in results:
        assert r["res"]["ok"], r["res"]
        assert r["version"] == 5 and r["rebuilt"] == 1 and r["res"]["bytes"] == n_bytes
        assert r["raw"]["ok"]
        state = torch.load(io.BytesIO(r["state"]))
        for k, v in sender_model.state_dict().items():
            assert torch.equal(state[k], v), k
            assert state[k].dtype == v.dtype


def _nccl_receiver_main(endpoint: SyncEndpoint, out: mp.Queue) -> None:
    torch.cuda.set_device(1)  # the receiver's own GPU: one NCCL group never holds two ranks on one device
    _receiver_main(endpoint, 1, out)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL sync group needs two GPUs (one rank per device)")
def test_nccl_sync_between_two_gpus_is_exact_and_versioned():
    ctx = mp.get_context("spawn")
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, backend="nccl", timeout_s=120)
    out = ctx.Queue()
    proc = ctx.Process(target=_nccl_receiver_main, args=(endpoint, out))
    proc.start()
    try:
        torch.cuda.set_device(0)
        sender_model = _model(seed=0).cuda(0)
        group = WeightGroup(endpoint, rank=0, device=torch.device("cuda", 0))
        stats = send_weights(group, sender_model, version=3, bucket_mb=0.002)
        raw_broadcast_seconds(group, stats.bytes)
        result = out.get(timeout=120)
        group.close()
    finally:
        proc.join(timeout=60)
    assert result["res"]["ok"], result["res"]
    assert result["version"] == 3 and result["rebuilt"] == 1
    state = torch.load(io.BytesIO(result["state"]))
    for k, v in sender_model.state_dict().items():
        assert torch.equal(state[k].cpu(), v.cpu()), k


def test_sync_to_absent_peer_raises_within_timeout():
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=3)
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout, match="did not join"):
        WeightGroup(endpoint, rank=0)
    assert time.monotonic() - start < 3 + 5


def _join_then_die(endpoint: SyncEndpoint) -> None:
    WeightGroup(endpoint, rank=1)  # joins, then the process exits without receiving anything


def test_sync_to_dead_peer_raises_within_timeout():
    ctx = mp.get_context("spawn")
    endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=4)
    p = ctx.Process(target=_join_then_die, args=(endpoint,))
    p.start()
    group = WeightGroup(endpoint, rank=0)
    p.join(timeout=30)
    assert p.exitcode == 0
    start = time.monotonic()
    with pytest.raises(WeightSyncTimeout):
        send_weights(group, _model(0), version=1, bucket_mb=0.002)
    assert time.monotonic() - start < 4 + 5
    group.close()


# --------------------------------------------------------------------------------- end to end with a vLLM engine


@pytest.mark.engine
def test_update_then_sync_to_a_vllm_engine_matches_trainer_logprobs(tmp_path):
    """One GRPO update on an engine rollout (the trainer's own loss code, plain torch), a sync over gloo into the
    hooked vLLM engine, then a mixed probe rollout: the engine's log-probs equal the trainer's recomputed ones on
    the NEW weights within 1e-4 (not the old), the policy version advanced, and the neighbor table was rebuilt."""
    import os
    import sys
    import threading
    from pathlib import Path

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
    from tiny_models import EOS_ID, write_tiny_model  # the engine tests' tiny checkpoint writer
    from transformers import AutoModelForCausalLM

    from ngrpo_ray.core.losses import GlobalNormalizers, PolicyLossConfig, policy_loss
    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.distributed.policy_worker import sequences_from_batches
    from ngrpo_ray.training.logprobs import response_logprobs
    from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm
    from ngrpo_ray.engine.records_client import check
    from ngrpo_ray.engine.rollout import generate_rollout

    temp, mixing = 0.8, MixingParams(rho=0.5, k=3)
    path = str(write_tiny_model(tmp_path / "qwen2", "qwen2", seed=1))
    llm = build_llm(EngineSpec(model=path, seed=0, max_model_len=256, max_num_seqs=16, kv_cache_gib=0.125))
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
        endpoint = SyncEndpoint("127.0.0.1", free_port(), world_size=2, backend="gloo", timeout_s=60)
        replies: dict[str, list] = {}

        def engine_side() -> None:
            replies["join"] = llm.collective_rpc("ngrpo_init_weight_group", args=(endpoint.__dict__, 1))
            replies["recv"] = llm.collective_rpc("ngrpo_receive_weights")

        t = threading.Thread(target=engine_side)
        t.start()
        group = WeightGroup(endpoint, rank=0)
        stats = send_weights(group, model, version=1, bucket_mb=1.0)
        t.join(timeout=120)
        group.close()
        assert all(r["ok"] for r in replies["join"]), replies["join"]
        assert all(r["ok"] for r in replies["recv"]), replies["recv"]
        assert replies["recv"][0]["version"] == 1 and replies["recv"][0]["bytes"] == stats.bytes
        assert llm.collective_rpc("ngrpo_policy_version") == [1]
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
        llm.llm_engine.engine_core.shutdown()
