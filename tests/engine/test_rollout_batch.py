"""RolloutBatch: validation, to_padded alignment with the records contract, concat."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.rollout_batch import RolloutBatch


def make_batch(version: int = 0, groups=(0, 0)) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=[torch.tensor([5, 6]), torch.tensor([7])],
        response_ids=[torch.tensor([10, 11, 1]), torch.tensor([12])],
        response_text=["a b", "c"],
        logprobs=[torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-0.25])],
        mixed_mask=[torch.tensor([False, True, False]), torch.tensor([True])],
        cand_ids=[torch.tensor([[10, 0], [11, 13], [1, 0]]), torch.tensor([[12, 14]])],
        alpha=[torch.tensor([[1.0, 0.0], [0.75, 0.25], [1.0, 0.0]]), torch.tensor([[0.5, 0.5]])],
        finish_reason=["stop", "length"],
        group_index=torch.tensor(list(groups)), sample_index=torch.tensor([0, 1]),
        policy_version=torch.tensor([version, version]),
        timings={"generation_s": 2.0, "tokens": 4.0, "tokens_per_s": 2.0},
    )


def test_to_padded_places_records_at_prompt_len_plus_t():
    p = make_batch().to_padded(pad_id=0)
    assert p.input_ids.tolist() == [[5, 6, 10, 11, 1], [7, 12, 0, 0, 0]]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert p.response_mask.tolist() == [[False, False, True, True, True], [False, True, False, False, False]]
    assert p.mixed_mask.tolist() == [[False, False, False, True, False], [False, True, False, False, False]]
    assert p.cand_ids[0, 3].tolist() == [11, 13] and p.alpha[0, 3].tolist() == [0.75, 0.25]
    assert p.cand_ids[1, 1].tolist() == [12, 14] and p.alpha[1, 1].tolist() == [0.5, 0.5]
    assert p.old_logprobs.tolist() == [[0, 0, -0.5, -1.0, -2.0], [0, -0.25, 0, 0, 0]]


def test_concat_offsets_groups_and_sums_timings():
    c = RolloutBatch.concat([make_batch(1, (0, 1)), make_batch(2, (0, 0))])
    assert c.group_index.tolist() == [0, 1, 2, 2]
    assert c.policy_version.tolist() == [1, 1, 2, 2]
    assert c.timings == {"generation_s": 4.0, "tokens": 8.0, "tokens_per_s": 2.0}
    assert (len(c), c.num_tokens, c.num_mixed) == (4, 8, 4)
    assert c.mixed_fraction == 0.5


def test_inconsistent_lengths_and_reasons_are_rejected():
    b = make_batch()
    with pytest.raises(ValueError, match="record lengths disagree"):
        RolloutBatch(**{**b.__dict__, "logprobs": [torch.zeros(2), torch.zeros(1)]})
    with pytest.raises(ValueError, match="finish_reason"):
        RolloutBatch(**{**b.__dict__, "finish_reason": ["stop", "abort"]})
