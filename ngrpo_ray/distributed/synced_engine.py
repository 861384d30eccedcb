"""A RolloutEngine that also receives weights from the trainer through vLLM's weight-transfer API.

The receiving side runs in the vLLM worker (its weight-transfer engine: ngrpo_gloo on CPU, vLLM's nccl / ipc on GPU);
this actor relays the four control-plane calls to it and refreshes the neighbor tables and the prefix cache after a
load.
"""

from __future__ import annotations

import ray

from ngrpo_ray.distributed.rollout_engine import RolloutEngineImpl


class SyncedRolloutEngineImpl(RolloutEngineImpl):
    def generate(self, *args, **kwargs):
        """The RolloutBatch, plus the mixed-vs-anchor cosine statistics of its mixed steps (paper appendix E),
        computed here where E lives; stored in `timings` under `mix_cosine_*` (they travel with the batch)."""
        batch = super().generate(*args, **kwargs)
        if batch.num_mixed:
            from ngrpo_ray.engine.request_options import to_wire

            mixing = kwargs.get("mixing", args[2] if len(args) > 2 else None)
            batch.timings.update(self._mix_cosine(batch, to_wire(mixing)["noise_std"]))
        return batch

    def _mix_cosine(self, batch, noise_std: float = 0.0) -> dict[str, float]:
        import torch

        from ngrpo_ray.core.diagnostics import mixed_anchor_cosine
        from ngrpo_ray.core.records import noise_from_seeds
        from ngrpo_ray.engine.records_client import check

        cand = torch.cat([c[m] for c, m in zip(batch.cand_ids, batch.mixed_mask)])
        alpha = torch.cat([a[m] for a, m in zip(batch.alpha, batch.mixed_mask)])
        ids, local = torch.unique(cand, return_inverse=True)
        rows = torch.tensor(check(self.llm.collective_rpc("ngrpo_embedding_rows", args=(ids.tolist(),)))["rows"])
        noise = None
        if batch.noise_seed is not None:  # Gaussian noise: the fed input is E[token] + noise from the seed
            seeds = torch.cat([s[m] for s, m in zip(batch.noise_seed, batch.mixed_mask)])
            noise = noise_from_seeds(seeds, rows.shape[1], noise_std)
        stats = mixed_anchor_cosine(rows, local, alpha, noise=noise)
        return {f"mix_cosine_{k}": float(v) for k, v in stats.items()}

    # -- vLLM's weight-sync control plane (driven by trainer rank 0 through weight_client.FleetWeightClient) -------
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        from ngrpo_ray.engine.records_client import check

        check(self.llm.collective_rpc("ngrpo_abandon_weight_update"))  # a trainer that died mid-sync left one open
        # vLLM's nccl receiver overwrites its communicator on re-init without destroying it (nccl_engine.py
        # init_transfer_engine): close the previous one, or every restart leaves a communicator and its buffers
        self.llm.collective_rpc("shutdown_weight_transfer_engine")
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self.llm.collective_rpc("update_weights", args=(update_info,))

    def finish_weight_update(self, policy_version: int) -> dict:
        """Finish the load, then refresh what depends on the weights: the neighbor tables (in the worker) and the
        prefix cache (cached KV blocks were computed with the old weights). Returns the engine's load timings."""
        import time

        from ngrpo_ray.engine.records_client import check

        t0 = time.monotonic()
        self.llm.collective_rpc("finish_weight_update")
        stats = check(self.llm.collective_rpc("ngrpo_weights_loaded", args=(int(policy_version),)))
        self.llm.reset_prefix_cache()
        self.policy_version = int(policy_version)
        stats["finish_seconds"] = time.monotonic() - t0
        return stats

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.collective_rpc("shutdown_weight_transfer_engine")

    def raw_broadcast(self, nbytes: int, chunk_mb: float | None = None) -> dict:
        """Receiving end of the trainer's raw broadcast of `nbytes` on the ngrpo_gloo group (the benchmark's floor)."""
        from ngrpo_ray.engine.records_client import check

        return check(self.llm.collective_rpc("ngrpo_raw_broadcast", args=(int(nbytes), chunk_mb)))


SyncedRolloutEngine = ray.remote(SyncedRolloutEngineImpl)
