"""What the trainer asks of DeepSpeed, checked on real one-process engines:
- the CPU start compiles no C++: its shared-memory inference all-reduce is marked unavailable before
  ``init_distributed``, so a trainer starts without a compiler and without the ~35 s build (measured: a 2-worker
  group started in 55 s with the build, 18 s without, on this 2-core machine);
- bf16 under ZeRO-2/3 accumulates gradients in fp32."""

import os
import subprocess
import sys


def test_cpu_comm_backend_builds_no_shm_op(tmp_path):
    script = """
import importlib, os
ds_torch = importlib.import_module("deepspeed.comm.torch")  # deepspeed.comm.torch as an attribute is torch
from ngrpo_ray.training.deepspeed_config import skip_shm_inference_op
skip_shm_inference_op()
assert ds_torch.build_shm_op() is None
assert not os.path.exists(os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "deepspeed_shm_comm"))
print("ok")
"""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_bf16_zero2_and_zero3_accumulate_gradients_in_fp32(tmp_path):
    """DeepSpeed's default accumulates in the model dtype; the trainer asks for fp32 (as OpenRLHF does) and DeepSpeed's
    ZeRO optimizer reports it, on a real one-rank engine (CPU, gloo)."""
    script = """
import os
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
import deepspeed, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings, build_config, build_optimizer, init_distributed
init_distributed(False)
for stage in (2, 3):
    m = Qwen2ForCausalLM(Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16)
    s = DeepSpeedSettings(zero_stage=stage, dtype="bf16")
    engine, *_ = deepspeed.initialize(model=m, optimizer=build_optimizer(s, m.parameters()), config=build_config(s, 4, 1))
    print(stage, engine.optimizer.gradient_accumulation_dtype)
assert "data_types" not in build_config(DeepSpeedSettings(zero_stage=2, dtype="fp32"), 1, 1)
"""
    from ngrpo_ray.distributed.weight_sync import free_port

    env = {**os.environ, "PORT": str(free_port()), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line[:1] in "23"] == ["2 torch.float32", "3 torch.float32"]
