"""The trainer's weight source finishes a pass its sender abandoned: under ZeRO-3 every parameter read is a gather
that all trainer ranks join, so rank 0 must run the ones a failed send skipped (or the others wait in them)."""

import torch

from ngrpo_ray.engine.trainer_weights import TrainerWeightSource


class _CountingSource(TrainerWeightSource):
    """Counts the parameters read, as the ZeRO-3 gathers would be counted on every rank."""

    reads = 0

    def _parameters(self):
        for item in super()._parameters():
            type(self).reads += 1
            yield item


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)])  # 10 parameters


def test_a_pass_abandoned_after_three_parameters_is_run_to_its_end():
    source = _CountingSource(_model())
    source.begin()
    for i, _ in enumerate(source):  # a sender that fails at its fourth tensor
        if i == 2:
            break
    assert _CountingSource.reads == 3
    assert source.finish() == 7 and _CountingSource.reads == 10


def test_a_sender_that_never_started_runs_the_whole_pass_and_a_finished_pass_nothing_more():
    _CountingSource.reads = 0
    source = _CountingSource(_model())
    source.begin()
    assert source.finish() == 10  # failed before its first tensor (the engines refused the update)
    source.begin()
    assert sum(1 for _ in source) == 10
    assert source.finish() == 0 and _CountingSource.reads == 20
