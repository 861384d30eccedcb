"""A RolloutEngine that also receives weights from the trainer over the dedicated sync group.

The receiving side runs in the vLLM worker (WeightReceiverMixin, through collective_rpc); this actor only relays the
join and receive calls and resets the prefix cache afterwards (cached KV blocks were computed with old weights).
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

    def join_weight_sync(self, endpoint: dict, rank_offset: int) -> dict:
        from ngrpo_ray.engine.records_client import check

        return check(self.llm.collective_rpc("ngrpo_init_weight_group", args=(endpoint, rank_offset)))

    def receive_weights(self, policy_version: int) -> dict:
        from ngrpo_ray.engine.records_client import check

        stats = check(self.llm.collective_rpc("ngrpo_receive_weights"))
        self.llm.reset_prefix_cache()
        self.policy_version = int(policy_version)
        return stats

    def raw_broadcast(self, nbytes: int, chunk_mb: float | None = None) -> dict:
        """Receiving end of the trainer's raw broadcast of `nbytes` on the sync group (the benchmark's floor)."""
        from ngrpo_ray.engine.records_client import check

        return check(self.llm.collective_rpc("ngrpo_raw_broadcast", args=(int(nbytes), chunk_mb)))


SyncedRolloutEngine = ray.remote(SyncedRolloutEngineImpl)
