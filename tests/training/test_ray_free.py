"""training/ is the Ray-free half of the trainer (train step, log-probs, DeepSpeed config, advantages, metrics, run
state) and placement planning needs no cluster: importing them must not import Ray (checked in a fresh interpreter)."""

import subprocess
import sys

MODULES = ["ngrpo_ray.training." + m for m in (
    "advantage_step", "deepspeed_config", "iteration_log", "iteration_metrics", "logprobs", "micro_batches",
    "off_policy", "prompt_order", "run_state", "staleness", "train_sequence", "train_step", "validation_keys")] + [
    "ngrpo_ray.distributed.placement", "ngrpo_ray.data.prompt_set"]


def test_training_modules_import_no_ray():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES)
            + "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
