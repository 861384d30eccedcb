import numpy as np

from ngrpo_ray.training.prompt_order import PromptOrder


def test_each_epoch_visits_every_problem_once():
    order = PromptOrder(num_problems=10, batch=5, seed=3)
    first_epoch = order.batch_at(0) + order.batch_at(1)
    assert sorted(first_epoch) == list(range(10))
    assert first_epoch != list(range(10))  # shuffled
    assert sorted(order.batch_at(2) + order.batch_at(3)) == list(range(10))
    assert order.batch_at(2) + order.batch_at(3) != first_epoch  # a new permutation per epoch


def test_batches_cross_epoch_boundaries():
    order = PromptOrder(num_problems=7, batch=3, seed=0)
    stream = [i for it in range(7) for i in order.batch_at(it)]  # 21 = 3 epochs
    for epoch in range(3):
        assert stream[7 * epoch: 7 * epoch + 7] == list(order.epoch_permutation(epoch))


def test_resume_sees_the_same_prompts():
    a, b = PromptOrder(50, 8, seed=11), PromptOrder(50, 8, seed=11)
    assert [a.batch_at(i) for i in range(2, 4)] == [b.batch_at(i) for i in range(2, 4)]
    assert PromptOrder(50, 8, seed=12).batch_at(0) != a.batch_at(0)
    assert np.array_equal(a.epoch_permutation(0), np.random.default_rng([11, 0]).permutation(50))
