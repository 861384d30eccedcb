"""Token-budget micro-batches: longest first, padded size (rows x longest row) within the budget."""

from ngrpo_ray.training.micro_batches import global_count, split_by_tokens, split_micro_batches

import torch


def test_budget_packs_sorted_by_length_within_the_padded_size():
    items = ["a", "b", "c", "d", "e", "f"]
    lengths = [5, 9, 3, 9, 4, 12]
    # longest first: f(12) | b(9), d(9) | a(5), e(4), c(3): 2 x 9 = 18 <= 20, 3 x 5 = 15 <= 20
    assert split_by_tokens(items, lengths, 20) == [["f"], ["b", "d"], ["a", "e", "c"]]
    # a sequence longer than the budget still gets a micro-batch of its own
    assert split_by_tokens(items, lengths, 10) == [["f"], ["b"], ["d"], ["a", "e"], ["c"]]
    assert split_by_tokens([], [], 10) == []


def test_count_split_is_unchanged_without_a_budget():
    assert split_micro_batches(list(range(5)), [1] * 5, 2, None) == [[0, 1], [2, 3, 4]]
    assert split_micro_batches(list(range(5)), [4, 4, 4, 4, 4], 2, 8) == [[0, 1], [2, 3], [4]]


def test_global_count_without_a_process_group_is_local():
    assert global_count(3, torch.device("cpu")) == 3
