"""One line of a memory plan: what occupies a GPU, how many bytes, and in which phase of an iteration."""

from __future__ import annotations

from dataclasses import dataclass

GIB = float(1 << 30)
# An "80 GB" card as CUDA counts it (torch.cuda.get_device_properties().total_memory, the total vLLM's
# gpu_memory_utilization multiplies): 79.15 GiB on an H100 80 GB, 79.35 GiB on an A100 80 GB, as their CUDA
# out-of-memory messages print it ("79.15 GiB total capacity"). Not measured by this project: no such card was lent.
DEFAULT_GPU_GIB = 79.15

# Phases of an iteration on one GPU. "resident": held for the whole run; "update": only while the trainer runs
# forward/backward/step; "rollout": only while the engine generates (its KV cache, its working memory); "sync": only
# while the new weights reach the engines (planning.sync_memory).
RESIDENT, UPDATE, ROLLOUT, SYNC = "resident", "update", "rollout", "sync"


@dataclass(frozen=True)
class Term:
    owner: str  # "trainer" or "engine"
    name: str
    bytes: float
    phase: str  # RESIDENT, UPDATE or ROLLOUT
    formula: str = ""  # how it was computed, in words and numbers

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
