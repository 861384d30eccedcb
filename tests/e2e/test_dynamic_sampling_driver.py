"""The driver with DAPO dynamic sampling and Latent-GRPO first-token selection: two iterations end to end (engine,
trainer, sync, MLflow); the counts add up, the refill prompts are the iteration's refill stream, and a resumed
iteration would draw the same ones."""

import json

import pytest

from ngrpo_ray.training.dynamic_sampling import refill_prompts
from ngrpo_ray.training.prompt_order import PromptOrder
from tests.e2e.test_train_driver import _cfg, tiny_model  # noqa: F401 - the module fixture
from tests.support.runs import train_and_read

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]

COUNTS = ["dynamic_sampling/groups_drawn", "dynamic_sampling/groups_kept", "dynamic_sampling/groups_dropped",
          "dynamic_sampling/groups_padded", "dynamic_sampling/refill_rounds", "adv/groups_without_correct",
          "adv/first_steps_zeroed"]


def test_two_iterations_with_dynamic_sampling_and_first_token_selection(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "ds"
    cfg = _cfg(tiny_model, out, "trainer.iterations=2", "trainer.validate_every=0", "trainer.checkpoint_every=0",
               "algorithm.dynamic_sampling=true", "algorithm.max_resample_rounds=1",
               "algorithm.first_token_selection=true")
    rec = train_and_read(cfg)
    assert rec.run.info.status == "FINISHED"
    for key in COUNTS:
        assert rec.steps(key) == [1, 2], key
    value = lambda key: [v for _, v in rec.history(key)]  # noqa: E731
    B = cfg.trainer.prompts_per_iteration
    for it in range(2):
        drawn, kept, dropped, padded, rounds = (value(k)[it] for k in COUNTS[:5])
        assert kept + padded == B and drawn == kept + dropped + padded
        assert rounds == (0 if kept == B else 1)  # one refill round allowed
        assert drawn == B if rounds == 0 else B < drawn <= 2 * B  # the refill draws the missing groups only
    audit = [json.loads(line) for line in (out / "dynamic_sampling.jsonl").read_text().splitlines()]
    order = PromptOrder(6, B, seed=cfg.trainer.seed)
    for it, entry in enumerate(audit):
        first = order.batch_at(it)
        assert [p.split("/")[-1] for p in entry["rounds"][0]] == [str(i) for i in first]
        if len(entry["rounds"]) > 1:  # the refill is the iteration's stream: a rerun draws the same problems
            refill = refill_prompts(6, first, cfg.trainer.seed, it, 0, len(entry["rounds"][1]))
            assert [p.split("/")[-1] for p in entry["rounds"][1]] == [str(i) for i in refill]
    assert rec.history("policy_version") == [(1, 1.0), (2, 2.0)]
