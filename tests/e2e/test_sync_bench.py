"""`ngrpo bench sync` on a tiny model: one trainer worker, one vLLM engine, a real sync and a raw broadcast per round.

The byte count must equal the model's parameter bytes and the bucket count must equal the plan's; the timings are
only checked for sanity (positive, the total at least the send side), since they are machine-dependent."""

from __future__ import annotations

import pytest
import ray
import torch

from ngrpo_ray.bench.sync_bench import run_sync_bench
from ngrpo_ray.distributed.weight_sync import plan_buckets
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]


def test_sync_bench_reports_the_models_bytes_and_a_ratio(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_chat_model(tmp_path / "tiny_chat")
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    named = list(model.named_parameters())  # tied embeddings appear once, as in the trainer's module
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    bucket_mb = 8.0  # several buckets: the 25 MB embedding alone, the layers packed together
    expected_buckets = len(plan_buckets(((n, tuple(p.shape), p.dtype) for n, p in named), bucket_mb, 1).buckets)
    assert expected_buckets > 1

    try:
        out = run_sync_bench(str(path), rounds=2, bucket_mb=bucket_mb, num_cpus=4, timeout_s=300)
    finally:
        ray.shutdown()

    assert out["bytes"] == param_bytes
    assert out["buckets"] == expected_buckets
    assert out["backend"] == "gloo" and out["rounds"] == 2
    assert [r["version"] for r in out["per_round"]] == [1, 2]
    assert all(r["bytes"] == param_bytes for r in out["per_round"])
    for r in out["per_round"]:
        assert r["raw_s"] > 0 and r["raw_engine_s"] > 0 and r["sync_send_s"] > 0 and r["engine_load_s"] > 0
        assert r["sync_total_s"] >= r["sync_send_s"]  # the driver's clock spans the trainer's send
    # The ratios are exactly the sums over rounds divided, as documented.
    assert out["ratio_send"] == pytest.approx(sum(r["sync_send_s"] for r in out["per_round"])
                                              / sum(r["raw_s"] for r in out["per_round"]), rel=1e-12)
    assert out["ratio_total"] == pytest.approx(sum(r["sync_total_s"] for r in out["per_round"])
                                               / sum(r["raw_s"] for r in out["per_round"]), rel=1e-12)
    assert out["ratio_total"] > out["ratio_send"] > 0
    assert out["raw_gb_per_s"] == pytest.approx(param_bytes * 2 / sum(r["raw_s"] for r in out["per_round"]) / 1e9)
