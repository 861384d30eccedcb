"""core.ring_budget: how many prompts one engine call may take so its mixed steps fit the ring, by hand."""

import pytest

from ngrpo_ray.config import load_config
from ngrpo_ray.config.load import ConfigError
from ngrpo_ray.core.ring_budget import calls_needed, prompts_per_call, slots_per_prompt


def test_the_papers_evaluation_needs_more_calls_than_engines():
    # math500 x 32 samples x 8,192 tokens at rho 0.1: 32 x 8192 x 0.1 x 1.05 = 27,525.12 slots per prompt
    assert slots_per_prompt(32, 8192, 0.1) == pytest.approx(27525.12)
    assert prompts_per_call(32, 8192, 0.1, 1 << 20) == 38  # 1,048,576 / 27,525.12 = 38.09
    assert calls_needed(500, 32, 8192, 0.1, 1 << 20) == 14  # 500 / 38 = 13.2: more than the 8 engines' one call each
    # soft thinking (every step mixes) with the preset's 8M slots: 8,388,608 / 275,251.2 = 30.5
    assert prompts_per_call(32, 8192, 1.0, 1 << 23) == 30


def test_no_mixing_no_limit_and_a_group_too_big_for_the_ring():
    assert prompts_per_call(32, 8192, 0.0, 1024) is None
    assert calls_needed(500, 32, 8192, 0.0, 1024) == 1
    assert calls_needed(0, 4, 64, 0.1, 1024) == 1
    with pytest.raises(ValueError, match="mixing.table_slots"):
        calls_needed(3, 4, 64, 1.0, 100)  # one group: 4 x 64 x 1.05 = 268.8 slots


def test_config_refuses_a_ring_smaller_than_one_group():
    # cpu_default: 8 responses x 64 tokens x rho 0.1 x 1.05 = 53.76 slots per prompt
    assert load_config("cpu_default", ["mixing.table_slots=54"]).mixing.table_slots == 54
    with pytest.raises(ConfigError, match=r"'mixing.table_slots' \(53\) cannot hold one prompt's rollout group"):
        load_config("cpu_default", ["mixing.table_slots=53"])
    # evaluation with mixing on: 40 x 64 x 0.1 x 1.05 = 268.8 slots per prompt (the rollout's 53.76 fit in 200)
    assert load_config("cpu_default", ["eval.n=40", "mixing.table_slots=200"]).mixing.table_slots == 200
    with pytest.raises(ConfigError, match="cannot hold one prompt's evaluation group: 40 responses x 64 tokens"):
        load_config("cpu_default", ["eval.mixing=true", "eval.n=40", "mixing.table_slots=200"])
    assert load_config("cpu_default", ["mixing.strategy=sample", "mixing.table_slots=1"]).mixing.table_slots == 1
