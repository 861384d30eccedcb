"""A RolloutEngine that also receives weights from the trainer over the dedicated sync group.

The receiving side runs in the vLLM worker (WeightReceiverMixin, through collective_rpc); this actor only relays the
join and receive calls and resets the prefix cache afterwards (cached KV blocks were computed with old weights).
"""

from __future__ import annotations

import ray

from ngrpo_ray.distributed.rollout_engine import RolloutEngineImpl


class SyncedRolloutEngineImpl(RolloutEngineImpl):
    def join_weight_sync(self, endpoint: dict, rank_offset: int) -> dict:
        from ngrpo_ray.engine.records_client import check

        return check(self.llm.collective_rpc("ngrpo_init_weight_group", args=(endpoint, rank_offset)))

    def receive_weights(self, policy_version: int) -> dict:
        from ngrpo_ray.engine.records_client import check

        stats = check(self.llm.collective_rpc("ngrpo_receive_weights"))
        self.llm.reset_prefix_cache()
        self.policy_version = int(policy_version)
        return stats


SyncedRolloutEngine = ray.remote(SyncedRolloutEngineImpl)
