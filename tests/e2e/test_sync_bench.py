"""`ngrpo bench sync` (the README's command, with --model) on a tiny model: one trainer worker, one vLLM engine, a
real sync through vLLM's weight-transfer API (ngrpo_gloo) and a raw broadcast per round. It runs with
``--transport gloo``, the bytes over the gloo group as to an engine on another node: every other end-to-end run
here has its engines on the trainer's host, so they sync through shared memory, and this is the test of the gloo
transport into a real vLLM worker.

The byte count must equal the model's parameter bytes and the message count must equal the layout's; the timings
are only checked for sanity (positive, the total at least the send side), since they are machine-dependent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ngrpo_ray.distributed.weight_sync import plan_messages
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]


def test_sync_bench_reports_the_models_bytes_and_a_ratio(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_chat_model(tmp_path / "tiny_chat")
    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    named = list(model.named_parameters())  # tied embeddings appear once, as in the trainer's module
    param_bytes = sum(p.numel() * p.element_size() for _, p in named)
    bucket_mb = 8.0  # the big tensors (the 25 MB embedding) travel alone, the small ones packed together
    # the gloo transport's layout
    expected_messages = len(plan_messages([p.numel() * p.element_size() for _, p in named], int(bucket_mb * 2**20)))
    assert expected_messages > 1

    # The README's command itself (`ngrpo bench sync`), on the tiny model: JSON on stdout, progress on stderr.
    proc = subprocess.run([sys.executable, "-m", "ngrpo_ray.cli", "bench", "sync", "--model", str(path), "--rounds", "2",
                           "--bucket-mb", str(bucket_mb), "--num-cpus", "4", "--timeout-s", "300",
                           "--transport", "gloo"],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bench sync rounds: 2/2, elapsed " in proc.stderr
    out = json.loads(proc.stdout)  # stdout is the JSON alone: Ray's forwarded worker lines go to stderr
    assert out["model_path"] == str(path)

    assert out["bytes"] == param_bytes
    assert out["messages"] == expected_messages
    assert out["backend"] == "ngrpo_gloo" and out["transport"] == "gloo" and out["rounds"] == 2
    assert [r["version"] for r in out["per_round"]] == [1, 2]
    assert all(r["bytes"] == param_bytes for r in out["per_round"])
    for r in out["per_round"]:
        assert r["raw_s"] > 0 and r["raw_engine_s"] > 0 and r["sync_send_s"] > 0 and r["engine_load_s"] > 0
        assert isinstance(r["engine_repack_page_faults"], int) and r["engine_repack_page_faults"] >= 0
        assert r["sync_total_s"] >= r["sync_send_s"]  # the driver's clock spans the trainer's send
        # the engine's load is its parts: load_weights (beyond waiting for bytes), GEMM re-pack, neighbor refresh
        assert r["engine_load_s"] == pytest.approx(r["engine_load_weights_s"] + r["engine_repack_s"]
                                                   + r["engine_refresh_s"], rel=1e-9)
    # The ratios are exactly the sums over rounds divided, as documented.
    assert out["ratio_send"] == pytest.approx(sum(r["sync_send_s"] for r in out["per_round"])
                                              / sum(r["raw_s"] for r in out["per_round"]), rel=1e-12)
    assert out["ratio_total"] == pytest.approx(sum(r["sync_total_s"] for r in out["per_round"])
                                               / sum(r["raw_s"] for r in out["per_round"]), rel=1e-12)
    assert out["ratio_total"] > out["ratio_send"] > 0
    assert out["raw_gb_per_s"] == pytest.approx(param_bytes * 2 / sum(r["raw_s"] for r in out["per_round"]) / 1e9)
