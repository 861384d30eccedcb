"""The trainer's weight source finishes a pass its sender abandoned: under ZeRO-3 every parameter read is a gather
that all trainer ranks join, so rank 0 must run the ones a failed send skipped (or the others wait in them). And under
ZeRO-3, vLLM's nccl packing (which holds several yielded tensors before copying them) reads the gathered values."""

import torch

from ngrpo_ray.engine.trainer_weights import TrainerWeightSource


class _CountingSource(TrainerWeightSource):
    """Counts the parameters read, as the ZeRO-3 gathers would be counted on every rank."""

    reads = 0

    def _parameters(self):
        for item in super()._parameters():
            type(self).reads += 1
            yield item


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)])  # 10 parameters


def test_a_pass_abandoned_after_three_parameters_is_run_to_its_end():
    source = _CountingSource(_model())
    source.begin()
    for i, _ in enumerate(source):  # a sender that fails at its fourth tensor
        if i == 2:
            break
    assert _CountingSource.reads == 3
    assert source.finish() == 7 and _CountingSource.reads == 10


def test_a_sender_that_never_started_runs_the_whole_pass_and_a_finished_pass_nothing_more():
    _CountingSource.reads = 0
    source = _CountingSource(_model())
    source.begin()
    assert source.finish() == 10  # failed before its first tensor (the engines refused the update)
    source.begin()
    assert sum(1 for _ in source) == 10
    assert source.finish() == 0 and _CountingSource.reads == 20


# vLLM's nccl sender packs several tensors from the source before it copies them into one buffer (pack_tensors keeps
# views of them). Under ZeRO-3 each of those is a gathered parameter that DeepSpeed partitions again as soon as the
# source moves on; the views must still hold the gathered values then. A one-rank ZeRO-3 engine on CPU (gloo), in a
# fresh process.
PACK_UNDER_ZERO3 = r"""
import json, os
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
import deepspeed, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor
from ngrpo_ray.engine.trainer_weights import TrainerWeightSource
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings, build_config, build_optimizer, init_distributed

init_distributed(False)
torch.manual_seed(0)
model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
want = {n: p.detach().clone() for n, p in model.named_parameters()}
s = DeepSpeedSettings(zero_stage=3, dtype="fp32")
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(s, model.parameters()),
                                  config=build_config(s, 1, 1))
assert all(p.numel() == 0 for p in engine.module.parameters())  # partitioned: nothing whole outside a gather
source, got, chunks = TrainerWeightSource(engine.module, zero3=True), {}, 0
params = iter(source)
while (chunk := pack_tensors(params, lambda item: item[1], buffer_size_bytes=20_000)) is not None:
    chunks += 1
    for name, t in unpack_tensor(chunk.packed_tensor, chunk.names, chunk.shapes, chunk.dtypes, chunk.tensor_sizes):
        got[name] = t.clone()
print(json.dumps({"chunks": chunks, "names": sorted(got) == sorted(want),
                  "differ": [n for n in want if not torch.equal(want[n], got[n])]}))
"""


def test_vllm_nccl_packing_of_a_zero3_source_holds_the_gathered_values(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from ngrpo_ray.distributed.weight_sync import free_port

    env = {**os.environ, "PORT": str(free_port()), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", PACK_UNDER_ZERO3], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"chunks": got["chunks"], "names": True, "differ": []} and got["chunks"] >= 3, got
