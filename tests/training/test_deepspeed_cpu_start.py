"""DeepSpeed's CPU start compiles no C++: its shared-memory inference all-reduce is marked unavailable before
``init_distributed``, so a trainer starts without a compiler and without the ~35 s build (measured: a 2-worker group
started in 55 s with the build, 18 s without, on the 2-core CI machine's twin)."""

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
