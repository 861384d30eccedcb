"""tests/gpu_device_check.sh runs on a lent CUDA machine that has torch, transformers and the carried DeepSpeed, but
no vLLM, Ray, MLflow or math-verify. A device session is minutes long and rare: its test files must collect there,
and whatever they import must import there. Checked here by hiding those packages (tests/support/gpu_machine_site)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu_device_check.sh"


def _script_test_files() -> list[str]:
    command = SCRIPT.read_text().split("pytest -m gpu", 1)[1].split("}", 1)[0]
    return re.findall(r"tests/\S+\.py", command)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'support' / 'gpu_machine_site'}{os.pathsep}{ROOT}",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_device_script_collects_without_vllm_ray_or_mlflow():
    files = _script_test_files()
    assert len(files) >= 6 and all((ROOT / f).exists() for f in files), files
    done = _run(["-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                 *files])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = re.search(r"(\d+)/\d+ tests collected", done.stdout)
    assert collected and int(collected.group(1)) >= 8, done.stdout[-2000:]


def test_what_the_gpu_tests_import_imports_without_vllm_ray_or_mlflow():
    modules = ["deepspeed", "ngrpo_ray.training.deepspeed_config", "ngrpo_ray.training.logprobs",
               "ngrpo_ray.training.reference_model", "ngrpo_ray.training.train_step", "ngrpo_ray.training.peak_memory",
               "ngrpo_ray.engine.neighbor_tables", "ngrpo_ray.core.losses", "tests.support.ragged_batch",
               "tests.support.padding_mask"]
    done = _run(["-c", "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
                 "import importlib.util\nassert importlib.util.find_spec('vllm') is None", *modules])
    assert done.returncode == 0, done.stderr[-3000:]
