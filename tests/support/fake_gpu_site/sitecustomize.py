"""Put on PYTHONPATH (with the repository root) of processes that vLLM spawns in a fake-GPU test (a tensor-parallel
engine's workers, which no test hook reaches): each fake is installed right after vLLM imports the transfer module
it replaces parts of (tests/support/fake_cuda_ipc.py, fake_nccl.py)."""

import importlib.abc
import importlib.util
import sys

_AFTER = {"vllm.distributed.weight_transfer.ipc_engine": "ipc", "vllm.distributed.weight_transfer.nccl_engine": "nccl"}


class _InstallAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _AFTER:
            return None
        sys.meta_path.remove(self)  # let the real finders answer, once
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from tests.support import fake_gpu

            fake_gpu.install(_AFTER[name])

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _InstallAfterImport())
