"""The reference model under ZeRO-3: partitioned over the ranks like the policy, with the same log-probs as a full
copy.

Two real DeepSpeed ranks on CPU (gloo), each a fresh process running ``load_reference_model`` on a tiny saved Qwen2.
Each rank holds half of the embedding and of the head (DeepSpeed's partition) and keeps no gathered copy; the
reference log-probs of a ragged batch, with rank 0 running three passes and rank 1 one (ZeRO-3 pads the busiest
rank's count, each pass a collective gather), equal those of the plain copy ZeRO-0/1/2 keeps, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

SCRIPT = r"""
import json, os, sys
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ["PORT"])
import torch
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings, init_distributed
from ngrpo_ray.training.logprobs import batched_logprobs
from ngrpo_ray.training.reference_model import load_reference_model
from ngrpo_ray.training.train_sequence import TrainSequence

init_distributed(False)
path, V = os.environ["MODEL"], 4096
ref = load_reference_model(path, torch.float32, torch.device("cpu"), DeepSpeedSettings(zero_stage=3), 2)
plain = load_reference_model(path, torch.float32, torch.device("cpu"), DeepSpeedSettings(zero_stage=2), 2)
g = torch.Generator().manual_seed(7 + rank)
seqs = []
for i in range(3 if rank == 0 else 1):
    P, T = 3 + i, 6 + 3 * i
    rec = ResponseRecord(response_ids=torch.randint(2, V, (T,), generator=g), logprobs=torch.zeros(T),
                         mixed_mask=torch.rand(T, generator=g) < 0.5, cand_ids=torch.randint(2, V, (T, 3), generator=g),
                         alpha=torch.softmax(torch.randn(T, 3, generator=g), -1))
    seqs.append(TrainSequence(prompt_ids=torch.randint(2, V, (P,), generator=g), record=rec,
                              advantage=torch.tensor(0.0), index=i))
got = batched_logprobs(ref.module, seqs, 0.7, 0, chunk=1, chunk_tokens=4, start_pass=ref.start_pass)
want = batched_logprobs(plain.module, seqs, 0.7, 0, chunk=1, chunk_tokens=4)
params = list(ref.module.parameters())
big = [ref.module.get_input_embeddings().weight, ref.module.get_output_embeddings().weight]
print(json.dumps({
    "zero3": ref.engine is not None, "plain_engine": plain.engine is not None,
    "full": sum(p.ds_numel for p in params), "plain_numel": sum(p.numel() for p in plain.module.parameters()),
    "big_local": [p.ds_tensor.numel() for p in big], "big_full": [p.ds_numel for p in big],
    "big_held": [p.data.numel() for p in big],
    "tokens": sum(x.numel() for x in got), "equal": all(torch.equal(a, b) for a, b in zip(got, want)),
}))
"""


def test_reference_is_partitioned_under_zero3_with_the_plain_copys_log_probs(tmp_path):
    from ngrpo_ray.distributed.weight_sync import free_port

    torch.manual_seed(0)
    # the embedding and the head (4096 x 64) are above ZeRO-3's persistence threshold (1e5 elements): partitioned;
    # the layers' small tensors stay gathered on every rank, as DeepSpeed keeps them by default
    cfg = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "model")
    env = {**os.environ, "PORT": str(free_port()), "MODEL": str(tmp_path / "model"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for rank, r in enumerate(results):
        assert r["zero3"] and not r["plain_engine"], r
        assert r["full"] == r["plain_numel"] == sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
        assert r["big_full"] == [4096 * 64] * 2 and r["big_local"] == [4096 * 32] * 2, r  # half on each rank
        assert r["big_held"] == [0, 0], r  # no gathered copy left behind after the passes
        assert r["tokens"] == (6 + 9 + 12 if rank == 0 else 6) and r["equal"], r


@pytest.mark.gpu
def test_zero3_reference_on_one_gpu_in_bf16_equals_the_plain_copy(tmp_path):
    """GPU only: the same through DeepSpeed's CUDA path (NCCL, bf16), one rank: log-probs equal the plain copy's."""
    import deepspeed

    from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
    from ngrpo_ray.training.logprobs import batched_logprobs
    from ngrpo_ray.training.reference_model import load_reference_model
    from ngrpo_ray.training.train_sequence import TrainSequence
    from tests.support.ragged_batch import ragged_batch

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed(dist_backend="nccl")  # a no-op when an earlier gpu test made the group
    V = 151_936
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    device = torch.device("cuda")
    ref = load_reference_model(str(tmp_path / "model"), torch.bfloat16, device, DeepSpeedSettings(3, "bf16"), 1)
    plain = load_reference_model(str(tmp_path / "model"), torch.bfloat16, device, DeepSpeedSettings(2, "bf16"), 1)
    prompts, records = ragged_batch((64, 32), (700, 300), V, mixed_fraction=0.2, seed=3)
    seqs = [TrainSequence(prompt_ids=p, record=r, advantage=torch.tensor(0.0), index=i)
            for i, (p, r) in enumerate(zip(prompts, records))]
    got = batched_logprobs(ref.module, seqs, 0.7, 0, chunk=2, chunk_tokens=256, start_pass=ref.start_pass)
    want = batched_logprobs(plain.module, seqs, 0.7, 0, chunk=2, chunk_tokens=256)
    assert ref.engine is not None and next(ref.module.parameters()).ds_tensor.is_cuda
    assert all(torch.equal(a, b) for a, b in zip(got, want))
