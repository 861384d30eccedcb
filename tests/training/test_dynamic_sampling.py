"""DAPO dynamic sampling on a constructed reward stream: the batch is refilled to B groups with signal, and the
counts are hand-computed."""

import numpy as np
import torch

from ngrpo_ray.core.rollout_batch import RolloutBatch
from ngrpo_ray.training.dynamic_sampling import fill_batch, has_signal, refill_prompts, select_groups
from ngrpo_ray.training.iteration_log import IterationLog

G = 2
# per problem: the rewards its group gets when drawn (1 1: too easy, 0 0: too hard, 1 0: signal)
REWARDS = {0: [1, 1], 1: [1, 0], 2: [0, 0], 3: [0, 1], 4: [0, 0], 5: [1, 0], 6: [1, 1], 7: [0.5, 0],
           8: [1, 1], 9: [0, 1]}


def run(first, refills, max_rounds, target=4):
    calls = []

    def draw(round_, problems):
        calls.append((round_, list(problems)))
        return np.array([r for p in problems for r in REWARDS[p]], dtype=np.float32)

    stream = list(refills)
    out = fill_batch(target, G, max_rounds, draw, first, lambda start, count: stream[start: start + count])
    return out, calls


def test_has_signal():
    assert has_signal(np.array([1, 1, 1, 0, 0, 0, 0.5, 0.5]), 2).tolist() == [False, True, False, False]


def test_refilled_to_the_target_with_signal():
    # round 0: problems 0 1 2 3 -> signal in 1, 3 (2 kept; 0, 2 dropped); 2 missing
    # round 1: refills 4 5 -> 5 kept (1 missing); round 2: refill 6 -> dropped; round 3: refill 7 -> kept: 4 kept
    out, calls = run([0, 1, 2, 3], [4, 5, 6, 7, 8, 9], max_rounds=5)
    assert calls == [(0, [0, 1, 2, 3]), (1, [4, 5]), (2, [6]), (3, [7])]
    assert out.picks == [(0, 1), (0, 3), (1, 1), (3, 0)]  # (round, group within the round), training order
    assert (out.groups_drawn, out.groups_kept, out.groups_dropped, out.groups_padded, out.refill_rounds) == (
        8, 4, 4, 0, 3)
    assert out.problems == [[0, 1, 2, 3], [4, 5], [6], [7]]
    assert out.metrics() == {"dynamic_sampling/groups_drawn": 8.0, "dynamic_sampling/groups_kept": 4.0,
                             "dynamic_sampling/groups_dropped": 4.0, "dynamic_sampling/groups_padded": 0.0,
                             "dynamic_sampling/refill_rounds": 3.0}


def test_no_refill_when_the_first_draw_has_signal_everywhere():
    out, calls = run([1, 3, 5, 9], [0, 2], max_rounds=3)
    assert calls == [(0, [1, 3, 5, 9])]
    assert out.picks == [(0, 0), (0, 1), (0, 2), (0, 3)] and out.groups_drawn == 4 and out.refill_rounds == 0


def test_rounds_run_out_then_pad_with_the_earliest_zero_variance_groups():
    # round 0: 0 1 2 3 -> kept 1, 3; no signal 0, 2. round 1 (the only refill): 4 6 -> no signal. 2 missing -> pad
    # with the earliest zero-variance groups (round 0's groups 0 and 2); 4, 6 are dropped.
    out, calls = run([0, 1, 2, 3], [4, 6, 8], max_rounds=1)
    assert calls == [(0, [0, 1, 2, 3]), (1, [4, 6])]
    assert out.picks == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert (out.groups_drawn, out.groups_kept, out.groups_dropped, out.groups_padded, out.refill_rounds) == (
        6, 2, 2, 2, 1)
    zero, _ = run([0, 2, 4, 6], [], max_rounds=0)  # max_resample_rounds 0: no refill at all
    assert (zero.groups_kept, zero.groups_padded, zero.groups_dropped, zero.refill_rounds) == (0, 4, 0, 0)


def test_refill_stream_is_a_function_of_the_iteration_and_skips_the_first_batch():
    first = [3, 7]
    a = refill_prompts(10, first, seed=5, iteration=2, start=0, count=8)
    assert sorted(a) == [0, 1, 2, 4, 5, 6, 8, 9]  # one cycle: every other problem once
    perm = [int(p) for p in np.random.default_rng([5, 0xDA90, 2, 0]).permutation(10) if p not in first]
    assert a == perm
    assert refill_prompts(10, first, 5, 2, start=3, count=2) == a[3:5]  # round k continues where k-1 stopped
    assert refill_prompts(10, first, 5, 3, 0, 8) != a  # another iteration, another stream
    wrap = refill_prompts(3, [0, 1, 2], seed=0, iteration=0, start=0, count=4)  # tiny set: later cycles repeat
    assert sorted(wrap[:3]) == [0, 1, 2] and len(wrap) == 4


def _batch(groups, G):
    n = len(groups) * G
    return RolloutBatch(
        prompt_ids=[torch.tensor([g]) for g in groups for _ in range(G)],
        response_ids=[torch.tensor([10 * g + s, 1]) for g in groups for s in range(G)],
        response_text=[f"{g}.{s}" for g in groups for s in range(G)],
        logprobs=[torch.tensor([-0.5, -0.25]) for _ in range(n)], mixed_mask=[torch.zeros(2, dtype=torch.bool)] * n,
        cand_ids=[torch.zeros(2, 1, dtype=torch.long)] * n, alpha=[torch.ones(2, 1)] * n,
        finish_reason=["stop"] * n, group_index=torch.arange(len(groups)).repeat_interleave(G),
        sample_index=torch.arange(G).repeat(len(groups)), policy_version=torch.full((n,), 3))


def test_select_groups_keeps_whole_groups_in_order():
    b = _batch([4, 5, 6], G=2)
    out = select_groups(b, [2, 0])
    assert out.response_text == ["4.0", "4.1", "6.0", "6.1"]
    assert out.group_index.tolist() == [0, 0, 2, 2] and out.sample_index.tolist() == [0, 1, 0, 1]
    assert [p.item() for p in out.prompt_ids] == [4, 4, 6, 6]


def test_iteration_line_shows_the_counts():
    line = IterationLog.line(3, {"dynamic_sampling/groups_drawn": 8.0, "dynamic_sampling/groups_kept": 4.0,
                                 "dynamic_sampling/groups_padded": 0.0, "dynamic_sampling/refill_rounds": 3.0})
    assert "groups 4/8 kept, 0 padded, 3 refills" in line
