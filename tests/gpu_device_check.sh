#!/usr/bin/env bash
# The gpu-marked tests that a CUDA machine without Ray, vLLM or a package registry can run: the trainer step at the
# paper's shapes (ZeRO-2 and ZeRO-3, bf16), the full fp32 neighbor-table build at the R1 vocabulary, and the trainer's
# forward without a padding mask (flash kernel, memory), the ZeRO-3 reference model and the trainer's peak-memory metrics. The engine's
# gpu tests (sleep/wake, vLLM's ipc and nccl weight transfer) need vLLM and skip or are left out here.
#
# Here:   make gpu-wheels                      (DeepSpeed and what it needs, as wheels in .whl/)
# There:  bash tests/gpu_device_check.sh       (with .whl carried; the log goes to $OUT, or runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if [ -d .whl ]; then  # the machine's own torch and transformers stay; the carried wheels go first on the path
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, deepspeed; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'deepspeed', \
deepspeed.__version__)"
    python3 -m pytest -m gpu -v -s -p no:cacheprovider -o addopts="" \
        tests/engine/test_neighbor_tables.py tests/engine/test_sleep_wake_gpu.py tests/distributed/test_trainer_gpu.py \
        tests/training/test_causal_forward_gpu.py tests/training/test_reference_model.py tests/training/test_peak_memory.py
} 2>&1 | tee "$out/gpu_check.log"
