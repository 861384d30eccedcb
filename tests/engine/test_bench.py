"""Done-when 5 (mechanics only; the SmolLM2 figure is measured outside CI): the bench times both engines and
reports tokens/s and slowdown = 1 - hooked / vanilla."""

from __future__ import annotations

import pytest

from ngrpo_ray.cli_bench import run_hook_overhead_bench, t_interval_95


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
    # each round runs both engines twice, mirrored (v h h v, then h v v h), and its tokens/s are those runs' sums
    assert [r["order"] for r in out["per_round"]] == ["vhhv", "hvvh"]
    for r in out["per_round"]:
        runs = r["tokens_per_s_in_order"]
        assert len(runs) == 4 and all(t > 0 for t in runs)
        v = [t for t, e in zip(runs, r["order"]) if e == "v"]
        h = [t for t, e in zip(runs, r["order"]) if e == "h"]
        # equal token counts per run, so the pair's tokens/s is the harmonic mean of its two runs
        assert r["vanilla_tokens_per_s"] == pytest.approx(2 / (1 / v[0] + 1 / v[1]))
        assert r["hooked_tokens_per_s"] == pytest.approx(2 / (1 / h[0] + 1 / h[1]))
    # the hooks' own time, read from the engine: a part of the hooked generate time, and not nothing
    assert 0.0 < out["hook_host_share"] < 1.0
    assert out["slowdown_ci95_of_rounds"] == t_interval_95([r["slowdown"] for r in out["per_round"]])


def test_t_interval_by_hand():
    # mean 0.02, sd 0.01 * sqrt(2), se 0.01, t(1) = 12.706
    assert t_interval_95([0.01, 0.03]) == pytest.approx([0.02 - 0.12706, 0.02 + 0.12706])
    # the 2026-12-07 rounds: mean 0.030, sd 0.04705, se 0.02104, t(4) = 2.776
    lo, hi = t_interval_95([0.062, 0.036, -0.050, 0.035, 0.067])
    assert (lo, hi) == pytest.approx((0.030 - 0.05841, 0.030 + 0.05841), abs=1e-4)
    assert t_interval_95([0.5]) is None


def test_the_bench_engines_differ_by_the_hook_alone():
    """The vanilla engine skips the tokenizer like the hooked one (a tokenizer in one engine only biased the bench
    by about 3 points in the hook's favour on 2026-12-03); every other engine argument is shared."""
    from ngrpo_ray.cli_bench import bench_engine_specs
    from ngrpo_ray.engine.llm_factory import EngineSpec, engine_kwargs

    plain, spec = bench_engine_specs(EngineSpec(model="m", neighbor_mode="full"))
    vanilla, hooked = engine_kwargs(plain, hooked=False), engine_kwargs(spec, hooked=True)
    assert vanilla["skip_tokenizer_init"] is True
    assert {k: hooked[k] for k in vanilla} == vanilla
    assert set(hooked) - set(vanilla) == {"worker_extension_cls", "async_scheduling", "additional_config"}
