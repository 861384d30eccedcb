"""Done-when 5 (mechanics only; the SmolLM2 figure is measured outside CI): the bench times both engines and
reports tokens/s and slowdown = 1 - hooked / vanilla."""

from __future__ import annotations

import pytest

from ngrpo_ray.cli_bench import run_hook_overhead_bench


@pytest.mark.engine
def test_hook_overhead_bench_reports_consistent_numbers(vanilla_qwen2_engine, qwen2_engine, tiny_models):
    out = run_hook_overhead_bench({"model": tiny_models["qwen2"], "rho": 0.5, "k": 3, "num_seqs": 4,
                                   "max_tokens": 8, "rounds": 2}, engines=(vanilla_qwen2_engine, qwen2_engine))
    assert out["vanilla_tokens_per_s"] > 0 and out["hooked_tokens_per_s"] > 0
    assert out["slowdown"] == pytest.approx(1 - out["hooked_tokens_per_s"] / out["vanilla_tokens_per_s"])
    assert len(out["per_round"]) == 2 and 0.1 < out["mixed_fraction"] < 0.9
    # the generate call alone is part of the hooked time, so it can only be slower than the whole by less
    for r in out["per_round"]:
        assert r["slowdown_generate"] <= r["slowdown"] + 1e-12
