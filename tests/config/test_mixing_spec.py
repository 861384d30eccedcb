"""The mixing options are declared once (core.mixing_spec): the config schema, the config loader, MixingParams and the
engine's wire form all read it, so each refuses the same values with the same key; what the engine cannot serve is
refused at config time (load_config / `ngrpo config --dry-run`), not at the first rollout."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from ngrpo_ray.config import load_config
from ngrpo_ray.config.load import ConfigError
from ngrpo_ray.config.schema import MixingConfig
from ngrpo_ray.core import mixing_spec
from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.request_options import to_wire

BAD = [  # (option, value, other options) refused by every layer, naming the option
    ("rho", 1.5, {}),
    ("rho", -0.1, {}),
    ("k", 0, {}),
    ("tau", 0.0, {}),
    ("noise_std", -1.0, {}),
    ("gumbel_tau", 0.0, {"strategy": "gumbel_topk"}),
    ("top_k", 0, {"strategy": "gumbel_topk"}),
    ("top_k", None, {"strategy": "latent_gumbel"}),
    ("noise_scale", 0.0, {"strategy": "latent_gumbel"}),
    ("noise_clamp", [3.0, -1.5], {"strategy": "latent_gumbel"}),
]


def test_the_schema_takes_its_choices_from_the_spec():
    hints = typing.get_type_hints(MixingConfig)
    assert typing.get_args(hints["strategy"]) == mixing_spec.STRATEGIES
    assert typing.get_args(hints["metric"]) == mixing_spec.METRICS
    assert typing.get_args(hints["alpha_source"]) == mixing_spec.ALPHA_SOURCES
    assert typing.get_args(hints["emit"]) == mixing_spec.EMIT_MODES
    # every option the spec declares is a config key and a MixingParams field (stop / never-mix ids: by name there)
    config_keys = {f.name for f in dataclasses.fields(MixingConfig)}
    params_keys = {f.name for f in dataclasses.fields(MixingParams)}
    assert set(mixing_spec.OPTIONS) <= config_keys and set(mixing_spec.OPTIONS) <= params_keys


@pytest.mark.parametrize("key,value,others", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_every_layer_refuses_the_same_value_naming_the_key(key, value, others):
    overrides = [f"mixing.{k}={v}" for k, v in others.items()]
    yaml_value = "null" if value is None else value
    with pytest.raises(ConfigError, match=f"'mixing.{key}'"):
        load_config("cpu_default", [*overrides, f"mixing.{key}={yaml_value}"])
    params_value = tuple(value) if isinstance(value, list) else value
    with pytest.raises(ValueError, match=f"mixing.{key} "):
        MixingParams(**others, **{key: params_value})
    with pytest.raises(ValueError, match=f"mixing.{key} "):
        to_wire({"strategy": "neighbor_mix", **others, key: value})


def test_what_the_engine_cannot_serve_is_refused_at_config_time():
    # soft thinking over the whole vocabulary is a valid core setting (the reference generator runs it) ...
    MixingParams(strategy="soft_thinking", top_k=None)
    # ... but the engine's ring holds at most ENGINE_MAX_WIDTH candidates per step: refused by the loader
    with pytest.raises(ConfigError, match="'mixing.top_k' must be an integer <= 64 in the engine"):
        load_config("baseline_soft_thinking_eval_1p5b", ["mixing.top_k=null"])
    with pytest.raises(ConfigError, match="'mixing.top_k' must be an integer <= 64 in the engine"):
        load_config("baseline_gumbel_soft_thinking_1p5b", ["mixing.top_k=100"])


@pytest.mark.parametrize("preset,strategy,width", [
    ("baseline_gumbel_soft_thinking_1p5b", "gumbel_topk", 3),
    ("baseline_soft_thinking_eval_1p5b", "soft_thinking", 10),
    ("baseline_grpo_soft_thinking_eval_1p5b", "soft_thinking", 10),
    ("latent_grpo_1p5b", "latent_gumbel", 10),
    ("r1_distill_1p5b_ngrpo_released_code", "neighbor_mix", 2),
])
def test_the_five_presets_reach_the_engine(preset, strategy, width):
    """The presets that the engine refused at the first rollout before: their options now pass the wire checks and
    the engine is built wide enough for their records."""
    from ngrpo_ray.distributed.components import engine_spec

    cfg = load_config(preset)
    assert cfg.mixing.strategy == strategy
    wire = to_wire(dataclasses.asdict(cfg.mixing))  # (stop / never-mix names are resolved by a tokenizer in a run)
    assert wire["strategy"] == strategy and wire["width"] == width
    assert engine_spec(cfg, "unused", 64)["k_max"] >= width
    if preset == "latent_grpo_1p5b":
        assert (wire["noise_clamp"], wire["one_sided"], wire["noise_scale"]) == ([-1.5, 3.0], True, 1.0)
    if preset.endswith("released_code"):
        assert (wire["alpha_source"], wire["emit"]) == ("filtered_probs", "sampled")
