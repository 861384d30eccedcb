"""The typed config: presets, dotted overrides, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from ngrpo_ray.config import Config, ConfigError, flatten, load_config, to_yaml
from ngrpo_ray.config.load import PRESET_DIR


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert (cfg.mixing.rho, cfg.mixing.k, cfg.rollout.temperature) == (0.1, 3, 0.7)
    assert (cfg.trainer.lr, cfg.algorithm.beta, cfg.rollout.group_size) == (1e-6, 0.001, 4)
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.top_p, cfg.eval.mixing) == (32, 0.6, 0.95, False)


def test_dotted_overrides_are_parsed_as_yaml():
    cfg = load_config("cpu_default", ["mixing.rho=0.2", "eval.benchmarks=[aime24, amc23]", "mixing.tau=null"])
    assert cfg.mixing.rho == 0.2
    assert cfg.eval.benchmarks == ["aime24", "amc23"]
    assert cfg.mixing.tau is None
    assert isinstance(load_config(None, ["trainer.lr=1"]).trainer.lr, float)
    assert load_config(None, ["trainer.lr=1e-5"]).trainer.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("mixing.rhoo=0.1", "unknown key 'mixing.rhoo' (did you mean 'mixing.rho'?)"),
        ("mixer.rho=0.1", "unknown key 'mixer' (did you mean 'mixing'?)"),
        ("mixing.metric=cos", "'mixing.metric' must be one of 'cosine', 'l2', 'l1', 'dot'; got 'cos'"),
        ("rollout.group_size=2.5", "'rollout.group_size' must be an integer, got 2.5"),
        ("trainer.lr=fast", "'trainer.lr' must be a number, got 'fast'"),
        ("trainer.lr=1e-5x", "'trainer.lr' must be a number, got '1e-5x'"),
        ("data.use_chat_template=1", "'data.use_chat_template' must be true or false, got 1"),
        ("mixing.rho=1.5", "'mixing.rho' must lie in [0, 1], got 1.5"),
        ("trainer.zero_stage=4", "'trainer.zero_stage' must be one of 0, 1, 2, 3; got 4"),
        ("eval.benchmarks=aime24", "'eval.benchmarks' must be a list"),
        ("mixing.stop_after=[1]", "'mixing.stop_after[0]' must be a string, got 1"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_rollout_correction_keys():
    a = load_config(None, ["algorithm.rollout_correction=mis", "algorithm.rollout_correction_level=sequence",
                           "algorithm.rollout_correction_cap=3"]).algorithm
    assert (a.rollout_correction, a.rollout_correction_level, a.rollout_correction_cap) == ("mis", "sequence", 3.0)
    assert load_config().algorithm.rollout_correction == "none"
    # bf16 paper presets: token TIS, cap 2; the fp32 CPU default: none (old log-probs are the engine's there)
    for name in ("paper_base", "r1_distill_1p5b_ngrpo", "r1_distill_1p5b_ngspo", "r1_distill_7b_grpo"):
        cfg = load_config(name)
        a = cfg.algorithm
        assert cfg.model.dtype == "bfloat16" and cfg.trainer.old_logprobs == "recompute", name
        assert (a.rollout_correction, a.rollout_correction_level, a.rollout_correction_cap) == ("tis", "token", 2.0)
    cpu = load_config("cpu_default")
    assert (cpu.model.dtype, cpu.algorithm.rollout_correction) == ("float32", "none")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.rollout_correction=is"], "'algorithm.rollout_correction' must be one of 'none', 'tis', 'mis'"),
        (["algorithm.rollout_correction_level=geometric"],
         "'algorithm.rollout_correction_level' must be one of 'token', 'sequence'"),
        (["algorithm.rollout_correction_cap=1.0"], "'algorithm.rollout_correction_cap' must be > 1, got 1.0"),
        (["algorithm.rollout_correction=tis", "trainer.old_logprobs=rollout"],
         "'algorithm.rollout_correction' 'tis' needs trainer.old_logprobs: recompute (got 'rollout'"),
        (["algorithm.rollout_correction=mis", "trainer.old_logprobs=rollout"],
         "'algorithm.rollout_correction' 'mis' needs trainer.old_logprobs: recompute"),
    ],
)
def test_rollout_correction_refusals_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_first_token_selection_is_refused_with_sequence_level_gspo():
    """First-token selection makes per-token advantages; GSPO proper takes one per sequence (the combination once
    failed only in the trainer's first update, found by the driver test)."""
    with pytest.raises(ConfigError, match="'algorithm.first_token_selection' .* use loss_type gspo_token"):
        load_config(None, ["algorithm.first_token_selection=true", "algorithm.loss_type=gspo"])
    for loss in ("grpo", "gspo_token", "dr_grpo"):
        cfg = load_config(None, ["algorithm.first_token_selection=true", f"algorithm.loss_type={loss}"])
        assert cfg.algorithm.loss_type == loss


def test_rollout_correction_refused_on_the_cpu_default_with_engine_log_probs():
    with pytest.raises(ConfigError, match="trainer.old_logprobs"):
        load_config("cpu_default", ["algorithm.rollout_correction=tis"])
    cfg = load_config("cpu_default", ["algorithm.rollout_correction=tis", "trainer.old_logprobs=recompute"])
    assert cfg.algorithm.rollout_correction == "tis"


@pytest.mark.parametrize("overrides, message", [
    (["trainer.max_staleness=0"], "'trainer.max_staleness' must be >= 1, got 0"),
    (["trainer.async_rollouts=true", "trainer.max_staleness=2"], "'trainer.max_staleness' only 1 is built (got 2)"),
    (["trainer.async_rollouts=true", "trainer.old_logprobs=recompute"],
     "'trainer.async_rollouts' needs trainer.old_logprobs: rollout"),
    (["trainer.async_rollouts=true", "algorithm.dynamic_sampling=true"],
     "'trainer.async_rollouts' cannot be combined with algorithm.dynamic_sampling"),
    (["trainer.async_rollouts=true", "trainer.use_gpu=true", "cluster.placement=colocated"],
     "'trainer.async_rollouts' cannot be combined with cluster.placement: colocated on GPU"),
])
def test_async_rollout_refusals_name_the_keys(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("cpu_default", overrides)
    assert message in str(err.value)


def test_async_rollouts_accept_engine_log_probs_or_a_correction():
    assert load_config("cpu_default", ["trainer.async_rollouts=true"]).trainer.async_rollouts
    cfg = load_config("cpu_default", ["trainer.async_rollouts=true", "trainer.old_logprobs=recompute",
                                      "algorithm.rollout_correction=tis", "trainer.max_staleness=1"])
    assert (cfg.trainer.max_staleness, cfg.algorithm.rollout_correction) == (1, "tis")


def test_batch_divisibility_is_checked():
    with pytest.raises(ConfigError, match="trainer.mini_batches"):
        load_config(None, ["trainer.prompts_per_iteration=3", "rollout.group_size=3", "trainer.mini_batches=2"])


def test_preset_inheritance_and_cycles(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("mixing: {rho: 0.05, k: 5}\ntrainer: {lr: 3.0e-6}\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\nmixing: {{rho: 0.15}}\n")
    cfg = load_config(child)
    assert (cfg.mixing.rho, cfg.mixing.k, cfg.trainer.lr) == (0.15, 5, 3e-6)
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cpu_default"):
        load_config("no_such_preset")


def test_every_preset_resolves():
    presets = sorted(PRESET_DIR.glob("*.yaml"))
    assert presets, "workflows/presets/ holds no preset"
    for preset in presets:
        assert isinstance(load_config(preset), Config), preset.name


def test_resolved_config_round_trips_through_yaml(tmp_path: Path):
    cfg = load_config("cpu_default", ["mixing.rho=0.3"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg
    assert flatten(cfg)["mixing.rho"] == 0.3


def _ngrpo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ngrpo_ray.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_lists_subcommands_and_rejects_bad_keys():
    out = _ngrpo("--help")
    assert out.returncode == 0
    for command in ("train", "eval", "bench", "demo", "config"):
        assert command in out.stdout
    for command in ("train", "eval", "demo"):
        assert "mixing.rho=0.2" in _ngrpo(command, "--help").stdout
    assert "hook-overhead" in _ngrpo("bench", "--help").stdout
    bad = _ngrpo("config", "mixing.rhoo=0.2")
    assert bad.returncode == 2
    assert "unknown key 'mixing.rhoo'" in bad.stderr
    good = _ngrpo("config", "mixing.rho=0.25")
    assert good.returncode == 0 and "rho: 0.25" in good.stdout


def test_every_preset_passes_a_cpu_dry_run():
    """Data loads and the model config is readable when present; only hub/user-file items may be skipped."""
    from ngrpo_ray.config.dry_run import dry_run

    skipped_reasons = set()
    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        if preset.stem == "paper_base":  # a shared base, not a runnable preset
            continue
        items = dry_run(load_config(preset))
        failed = [i for i in items if i.status == "failed"]
        assert not failed, (preset.name, failed)
        by_what = {i.what.split(" ")[0]: i for i in items}
        assert by_what["train"].status in ("ok", "skipped") and by_what["hardware"].detail.startswith("written for")
        for i in items:
            if i.status == "skipped":
                skipped_reasons.add(i.what)
            if i.what.startswith("eval math500"):
                assert i.status == "ok" and i.detail.startswith("500 problems"), i
    # only what needs a hub or a user file is skipped: DeepScaleR and the hub models
    assert all(w.startswith(("train deepscaler", "model ")) for w in skipped_reasons), skipped_reasons


def test_best_metric_must_be_a_key_the_validation_logs():
    from ngrpo_ray.evaluation.report import PASS_KS
    from ngrpo_ray.training.validation_keys import PASS_KS as KEY_PASS_KS

    assert KEY_PASS_KS == PASS_KS
    cfg = load_config("r1_distill_1p5b_ngrpo")  # validation aime24, best by val/aime24/mean_at_n
    assert cfg.trainer.best_metric == "val/aime24/mean_at_n"
    load_config("r1_distill_1p5b_ngrpo", ["trainer.best_metric=val/aime24/pass@8"])  # "@" as in the reports
    load_config("r1_distill_1p5b_ngrpo", ["trainer.best_metric=val/mean_at_n"])  # pooled
    with pytest.raises(ConfigError) as err:
        load_config("r1_distill_1p5b_ngrpo", ["trainer.best_metric=val/aime25/mean_at_n"])
    message = str(err.value)
    assert message.startswith("'trainer.best_metric' 'val/aime25/mean_at_n' is not a key the validation logs "
                              "(data.validation='aime24', eval.n=32); allowed: val/mean_at_n, val/pass_at_1,")
    assert "val/aime24/pass_at_32" in message and "val/aime24/mean_at_n_ci_high" in message
    with pytest.raises(ConfigError, match="allowed: .*val/aime24/pass_at_4, val/aime24/mean_at_n_ci_low"):
        load_config("r1_distill_1p5b_ngrpo", ["eval.n=4", "trainer.best_metric=val/aime24/pass_at_8"])
    # a local file is named by its stem
    local = load_config("cpu_default", ["data.validation=/data/held-out v2.jsonl",
                                        "trainer.best_metric=val/held-out_v2/mean_at_n"])
    assert local.trainer.best_metric == "val/held-out_v2/mean_at_n"
    load_config(None, ["trainer.best_metric=anything"])  # no validation set: nothing to check against


def test_checkpoint_keys_are_checked():
    with pytest.raises(ConfigError, match="'trainer.keep_checkpoints' must be >= 1, got 0"):
        load_config(None, ["trainer.keep_checkpoints=0"])
    with pytest.raises(ConfigError, match="'trainer.hf_export_every' must be >= 0, got -1"):
        load_config(None, ["trainer.hf_export_every=-1"])
