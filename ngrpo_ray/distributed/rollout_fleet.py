"""Several RolloutEngine actors behind one call: prompts spread over engines, results kept in prompt order.

`generate` splits the prompts into contiguous chunks, hands each chunk to the engine with the least outstanding work
(prompts in flight), and returns one ObjectRef per chunk in prompt order, with the offset of each chunk's first
prompt, so the caller can map a chunk's local group index back to the global prompt index. Tensors stay in the
object store: the driver only holds refs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import ray

from ngrpo_ray.distributed.synced_engine import SyncedRolloutEngine


@dataclass
class Chunk:
    ref: ray.ObjectRef
    first_prompt: int
    num_prompts: int
    engine: int


class RolloutFleet:
    def __init__(self, spec: dict, num_engines: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 policy_version: int = 0):
        self.spec = spec
        self.engines = [
            SyncedRolloutEngine.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(spec, policy_version)
            for _ in range(num_engines)
        ]
        ray.get([e.health.remote() for e in self.engines])  # fail here, clearly, if an engine cannot start
        self.prompts_served = [0] * num_engines

    def __len__(self) -> int:
        return len(self.engines)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: dict, mixing: Any, policy_version: int,
                 group_size: int, chunks_per_engine: int = 1) -> list[Chunk]:
        n_chunks = max(1, min(len(prompts), len(self.engines) * chunks_per_engine))
        bounds = [round(i * len(prompts) / n_chunks) for i in range(n_chunks + 1)]
        outstanding = [0] * len(self.engines)
        chunks = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            e = min(range(len(self.engines)), key=lambda i: (outstanding[i], i))
            outstanding[e] += hi - lo
            self.prompts_served[e] += hi - lo
            ref = self.engines[e].generate.remote([list(p) for p in prompts[lo:hi]], sampling, mixing,
                                                  policy_version, group_size)
            chunks.append(Chunk(ref, lo, hi - lo, e))
        return chunks

    def join_weight_sync(self, endpoint: dict) -> list[ray.ObjectRef]:
        tp = 1  # tensor parallel ranks per engine (CPU: 1); rank 0 of the sync group is the trainer
        return [e.join_weight_sync.remote(endpoint, 1 + i * tp) for i, e in enumerate(self.engines)]

    def receive_weights(self, policy_version: int) -> list[ray.ObjectRef]:
        return [e.receive_weights.remote(policy_version) for e in self.engines]

    def shutdown(self) -> None:
        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the actor may already be gone; kill below either way
                pass
            ray.kill(e)
