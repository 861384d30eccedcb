"""The comparison workflow's plan (one run per method and seed, configs checked up front) and its table (seeds
pooled per method, paired differences), on hand-made per-sample grades."""

from pathlib import Path

import numpy as np
import pytest

from ngrpo_ray.compare import comparison_table, format_comparison, plan_runs
from ngrpo_ray.config import load_config


def test_plan_has_one_checked_run_per_method_and_seed(tmp_path):
    plan = plan_runs("cpu_default", ["trainer.iterations=3"], ["grpo", "n-grpo", "stht"], [0, 1], tmp_path)
    assert [(r.method, r.seed) for r in plan] == [("grpo", 0), ("grpo", 1), ("n-grpo", 0), ("n-grpo", 1),
                                                  ("stht", 0), ("stht", 1)]
    cfgs = [load_config("cpu_default", list(r.overrides)) for r in plan]
    assert [c.mixing.strategy for c in cfgs] == ["sample"] * 2 + ["neighbor_mix"] * 2 + ["gaussian_noise"] * 2
    assert cfgs[0].mixing.rho == 0.0 and cfgs[2].mixing.rho == cfgs[4].mixing.rho == 0.1  # same gate rate
    assert [c.trainer.validate_before for c in cfgs] == [True] + [False] * 5  # the base is validated once
    assert all(c.trainer.validate_every == 3 for c in cfgs)  # the final validation is the compared one
    assert [(c.trainer.seed, c.rollout.seed, c.mixing.seed) for c in cfgs[:2]] == [(0, 0, 0), (1, 1, 1)]
    assert len({c.trainer.output_dir for c in cfgs}) == 6
    assert len({c.tracking.tracking_uri for c in cfgs}) == 1  # one MLflow store for all runs
    with pytest.raises(ValueError, match="unknown method"):
        plan_runs("cpu_default", [], ["grpo", "ppo"], [0], tmp_path)


def _write(folder: Path, step: int, grades) -> None:
    (folder / "validation").mkdir(parents=True, exist_ok=True)
    np.save(folder / "validation" / f"step_{step}.npy", np.asarray(grades, dtype=bool))


def test_table_pools_seeds_and_pairs_problems(tmp_path):
    plan = plan_runs("cpu_default", ["trainer.iterations=2"], ["grpo", "n-grpo"], [0, 1], tmp_path)
    _write(plan[0].output_dir, 0, [[1, 0], [0, 0], [1, 1], [0, 0]])  # base: mean 3/8
    _write(plan[0].output_dir, 2, [[1, 1], [0, 0], [1, 0], [0, 0]])  # grpo seed 0: 3/8
    _write(plan[1].output_dir, 2, [[1, 0], [1, 0], [1, 1], [0, 0]])  # grpo seed 1: 4/8
    _write(plan[2].output_dir, 2, [[1, 1], [1, 1], [1, 1], [0, 0]])  # n-grpo seed 0: 6/8
    _write(plan[3].output_dir, 2, [[1, 1], [0, 1], [1, 1], [1, 0]])  # n-grpo seed 1: 6/8
    t = comparison_table(plan, tmp_path)
    rows = t["rows"]
    assert (t["problems"], t["base_n"], t["n_per_run"], t["pass_k_max"]) == (4, 2, 2, 2)
    assert rows["base"]["mean@n"]["value"] == pytest.approx(3 / 8)
    assert rows["grpo"]["mean@n"]["value"] == pytest.approx(7 / 16)
    assert rows["n-grpo"]["mean@n"]["value"] == pytest.approx(12 / 16)
    assert rows["grpo"]["seeds"] == {0: pytest.approx(3 / 8), 1: pytest.approx(4 / 8)}
    # pooled n-grpo per problem: 4/4, 3/4, 4/4, 1/4; pass@2 unbiased: 1 - C(4-c, 2)/C(4, 2) -> 1, 1, 1, 0.5
    assert rows["n-grpo"]["pass@2"]["value"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert set(rows["n-grpo"]) >= {"pass@1", "pass@2"} and "pass@4" not in rows["n-grpo"]  # capped at base n
    d = rows["n-grpo"]["mean@n - grpo"]
    assert d["value"] == pytest.approx(12 / 16 - 7 / 16) and d["ci_low"] <= d["value"] <= d["ci_high"]
    assert rows["grpo"]["mean@n - base"]["value"] == pytest.approx(7 / 16 - 3 / 8)
    assert "mean@n - grpo" not in rows["grpo"]
    text = format_comparison(t)
    assert "| n-grpo | 75.0 [" in text and "| vs grpo (paired) |" in text
    assert "37.5, 50.0" in text  # grpo's per-seed Mean@n
