"""Dynamic sampling on a real fleet (two vLLM engines, tiny model) with a constructed reward stream: the batch is
refilled to B groups with signal across rounds, chunks with dropped groups are cut next to the batch, and the rows
the trainer gets line up with the rewards and counts."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import ray

from ngrpo_ray.config import load_config
from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.distributed.dynamic_batch import sample_with_signal
from ngrpo_ray.distributed.reward_scorer import rollout_facts
from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.training.dynamic_sampling import refill_prompts
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.engine]

G = 2
PROMPTS = [[100 + i, 2000 + 7 * i, 3000 + 11 * i] for i in range(10)]


@ray.remote(num_cpus=0.1)
class StreamScorer:
    """Rewards from the gold alone: "easy" all 1, "hard" all 0, "mixed" 1 for sample 0 and 0 for the others."""

    def score(self, batch, golds, kind="math"):
        out = rollout_facts(batch)
        gold = [golds[int(g)] for g in batch.group_index]
        out["rewards"] = np.array([{"easy": 1.0, "hard": 0.0}.get(k, float(s == 0))
                                   for k, s in zip(gold, batch.sample_index.tolist())], dtype=np.float32)
        out["status"] = ["ok"] * len(batch)
        out["grading"] = {"graded": len(batch)}
        out["timings"] = dict(batch.timings)
        return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model = write_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny_chat")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    spec = {"model": str(model), "seed": 0, "max_model_len": 256, "kv_cache_gib": 0.125}
    f = RolloutFleet(spec, 2, num_cpus=0.5)
    yield f
    f.shutdown()
    ray.shutdown()


def test_refilled_across_rounds_with_cut_chunks(fleet, tmp_path):
    cfg = load_config("cpu_default", ["rollout.group_size=2", "trainer.prompts_per_iteration=4",
                                      "trainer.mini_batches=1", "algorithm.dynamic_sampling=true",
                                      "algorithm.max_resample_rounds=3", "trainer.seed=7"])
    first = [0, 1, 2, 3]
    a, b, c = refill_prompts(10, first, seed=7, iteration=5, start=0, count=3)
    golds = ["mixed"] * 10
    golds[0], golds[2], golds[a] = "easy", "hard", "hard"
    # round 0: 0 1 2 3 -> kept 1, 3 (2 missing); round 1: a b -> kept b (1 missing); round 2: c -> kept: 4, done
    train_set = SimpleNamespace(prompts=PROMPTS, golds=golds, ids=[f"p{i}" for i in range(10)], kind="math")
    sampling = {"temperature": 1.0, "max_tokens": 4, "ignore_eos": True}
    scored, metrics = sample_with_signal(cfg, fleet, StreamScorer.remote(), train_set, first, 5, sampling,
                                         MixingParams(rho=0.5, k=3), 0, log_dir=tmp_path)
    # drawn rewards: round 0 1 1 | 1 0 | 0 0 | 1 0, round 1 0 0 | 1 0, round 2 1 0: 6 of 14
    assert metrics == {"dynamic_sampling/groups_drawn": 7.0, "dynamic_sampling/groups_kept": 4.0,
                       "dynamic_sampling/groups_dropped": 3.0, "dynamic_sampling/groups_padded": 0.0,
                       "dynamic_sampling/refill_rounds": 2.0,
                       "dynamic_sampling/drawn_reward_mean": pytest.approx(6 / 14, rel=1e-6)}
    batches = ray.get([ch.ref for ch in scored.chunks])
    prompts = [p.tolist() for bt in batches for p in bt.prompt_ids]
    assert prompts == [PROMPTS[i] for i in (1, 1, 3, 3, b, b, c, c)]  # what the trainer gets, group-major
    assert [s for bt in batches for s in bt.sample_index.tolist()] == [0, 1] * 4
    assert scored.rewards.tolist() == [1.0, 0.0] * 4 and scored.sample.tolist() == [0, 1] * 4
    assert scored.length.tolist() == [int(r.numel()) for bt in batches for r in bt.response_ids]
    assert scored.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert scored.grading == {"graded": 14}
    log = (tmp_path / "dynamic_sampling.jsonl").read_text()
    assert f'"rounds": [["p0", "p1", "p2", "p3"], ["p{a}", "p{b}"], ["p{c}"]]' in log
