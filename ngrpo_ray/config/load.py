"""Build a validated `Config` from YAML presets and dotted overrides.

A preset may name another with `base: <preset>`; the child's keys override the parent's. Overrides are
`section.key=value` strings whose value is parsed as YAML (`mixing.rho=0.2`, `eval.benchmarks=[aime24]`).
Nothing is ignored: an unknown key, a wrong type or a value outside the allowed set raises `ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ngrpo_ray.config.schema import Config
from ngrpo_ray.core import mixing_spec

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
PRESET_DIR = Path(__file__).resolve().parents[2] / "workflows" / "presets"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def load_config(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = _read_preset(preset) if preset else {}
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(Config, raw)
    validate(cfg)
    return cfg


def preset_path(name: str | Path) -> Path:
    """A preset by file path, or by name from workflows/presets/ (with or without .yaml)."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = PRESET_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if candidate.exists():
        return candidate
    known = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"preset '{name}' not found (neither a file nor one of: {', '.join(known)})")


def _read_preset(name: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    path = preset_path(name).resolve()
    if path in seen:
        raise ConfigError(f"preset '{path.name}' includes itself through 'base'")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset '{path.name}' must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_read_preset(base, seen + (path,)), data)


def _deep_merge(parent: dict, child: dict) -> dict:
    out = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = yaml.safe_load(text) if text.strip() else None


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Recursively build dataclass `cls` from a mapping, checking every key and type."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean '{_join(path, near[0])}'?)" if near else ""
            raise ConfigError(f"unknown key '{_join(path, key)}'{hint}; allowed keys in '{where}': {', '.join(names)}")
    kwargs = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': {value!r} matches none of {options}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"'{key}' must be one of {allowed}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-6" as a string; users mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"'{key}': unsupported type {tp}")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}' {message}")


def validate(cfg: Config) -> None:
    """Range and cross-field checks that types alone cannot express."""
    m, r, a, t = cfg.mixing, cfg.rollout, cfg.algorithm, cfg.trainer
    _validate_mixing(m)
    _check_ring(cfg)
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must lie in (0, 1], got {r.top_p}")
    _check(r.group_size >= 1, "rollout.group_size", f"must be >= 1, got {r.group_size}")
    _check(r.num_engines >= 1, "rollout.num_engines", f"must be >= 1, got {r.num_engines}")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", f"must be >= 1, got {r.tensor_parallel_size}")
    _check(not t.use_gpu or r.engine_gpus == 1, "rollout.engine_gpus",
           f"must be 1 on GPU runs, got {r.engine_gpus}: one vLLM worker per GPU (a fractional share could put two "
           "members of the NCCL weight-sync group on one GPU; colocated engines share their host trainer's GPU and "
           "take rollout.gpu_memory_utilization of it)")
    ranks = r.num_engines * r.tensor_parallel_size
    _check(cfg.cluster.placement != "colocated" or ranks <= t.num_workers, "rollout.num_engines",
           f"x rollout.tensor_parallel_size ({ranks}) must be <= trainer.num_workers ({t.num_workers}) in the "
           "colocated layout: every engine rank shares a trainer rank's GPU")
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must lie in (0, 1]")
    _check(a.eps_low >= 0 and a.eps_high >= 0, "algorithm.eps_low/eps_high", "must be >= 0")
    _check(a.dual_clip is None or a.dual_clip > 1, "algorithm.dual_clip", f"must be > 1 or null, got {a.dual_clip}")
    _check(a.beta >= 0, "algorithm.beta", f"must be >= 0, got {a.beta}")
    _check(a.max_resample_rounds >= 0, "algorithm.max_resample_rounds", f"must be >= 0, got {a.max_resample_rounds}")
    _check(not a.dynamic_sampling or r.group_size >= 2, "algorithm.dynamic_sampling",
           f"needs rollout.group_size >= 2 (a group of {r.group_size} never has reward variance)")
    _check(not (a.first_token_selection and a.loss_type == "gspo"), "algorithm.first_token_selection",
           "gives each token its own advantage (the first step's is zeroed for all but the group's best correct "
           "response), and loss_type 'gspo' takes one advantage per sequence: use loss_type gspo_token (GSPO-token) "
           "or grpo")
    _check(a.rollout_correction_cap > 1, "algorithm.rollout_correction_cap",
           f"must be > 1, got {a.rollout_correction_cap}")
    _check(a.rollout_correction == "none" or t.old_logprobs == "recompute", "algorithm.rollout_correction",
           f"'{a.rollout_correction}' needs trainer.old_logprobs: recompute (got '{t.old_logprobs}': the trainer then "
           "takes the engine's log-probs as pi_old, so pi_old / pi_behaviour = 1 and the correction would do nothing)")
    _validate_async(cfg)
    _check(t.num_workers >= 1, "trainer.num_workers", f"must be >= 1, got {t.num_workers}")
    _check(t.lr > 0, "trainer.lr", f"must be > 0, got {t.lr}")
    _check(t.mini_batches >= 1, "trainer.mini_batches", f"must be >= 1, got {t.mini_batches}")
    _check(t.micro_batch_size >= 1, "trainer.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _check(t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
           "trainer.max_tokens_per_micro_batch", f"must be >= 1 or null, got {t.max_tokens_per_micro_batch}")
    _check(t.logprob_chunk_tokens >= 1, "trainer.logprob_chunk_tokens", f"must be >= 1, got {t.logprob_chunk_tokens}")
    rollout_batch = t.prompts_per_iteration * r.group_size
    _check(rollout_batch % (t.mini_batches * t.num_workers) == 0, "trainer.mini_batches",
           f"x trainer.num_workers ({t.mini_batches} x {t.num_workers}) must divide the rollout batch "
           f"trainer.prompts_per_iteration x rollout.group_size = {rollout_batch}")
    _check(t.keep_checkpoints >= 1, "trainer.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    _check(t.hf_export_every >= 0, "trainer.hf_export_every", f"must be >= 0, got {t.hf_export_every}")
    _check_best_metric(cfg)
    c = cfg.cluster
    _check(c.sync_backend != "nccl" or t.use_gpu, "cluster.sync_backend",
           "'nccl' needs GPUs (trainer.use_gpu: true); use 'auto' or 'gloo' on CPU")
    _check(all(x >= 0 for x in r.stop_token_ids), "rollout.stop_token_ids", f"must be token ids >= 0, got {r.stop_token_ids}")
    _check(c.engine_max_restarts >= 0, "cluster.engine_max_restarts", f"must be >= 0, got {c.engine_max_restarts}")
    _check(c.trainer_max_restarts >= 0, "cluster.trainer_max_restarts", f"must be >= 0, got {c.trainer_max_restarts}")
    _check(c.engine_restart_timeout_s > 0, "cluster.engine_restart_timeout_s",
           f"must be > 0, got {c.engine_restart_timeout_s}")
    _check(cfg.eval.n >= 1, "eval.n", f"must be >= 1, got {cfg.eval.n}")


def _validate_async(cfg: Config) -> None:
    """What one-step-off rollouts (trainer.async_rollouts) cannot be combined with, refused here."""
    t, a = cfg.trainer, cfg.algorithm
    _check(t.max_staleness >= 1, "trainer.max_staleness", f"must be >= 1, got {t.max_staleness}")
    # A deeper bound would be accepted and never reached: one rollout is in flight and the weight sync waits for it,
    # so no sample is ever more than one version old. Deeper pipelines need syncs that interrupt rollouts.
    _check(t.max_staleness == 1, "trainer.max_staleness",
           f"only 1 is built (got {t.max_staleness}): the asynchronous pipeline is one step deep, so no sample "
           "can be more than one version old and a larger bound would never be used")
    if not t.async_rollouts:
        return
    _check(t.old_logprobs == "rollout" or a.rollout_correction != "none", "trainer.async_rollouts",
           "needs trainer.old_logprobs: rollout (the ratio's pi_old is the engine's behaviour log-prob) or "
           "algorithm.rollout_correction: tis/mis (decoupled: the recomputed pi_old, weighted by pi_old / "
           "pi_behaviour); with recompute and no correction a sample drawn one version ago would be treated as "
           "drawn by the trainer's current policy")
    _check(not a.dynamic_sampling, "trainer.async_rollouts",
           "cannot be combined with algorithm.dynamic_sampling: its refill rounds need the rewards of the batch "
           "before the next rollout may start")
    _check(not (t.use_gpu and cfg.cluster.placement == "colocated"), "trainer.async_rollouts",
           "cannot be combined with cluster.placement: colocated on GPU: the engines sleep during the update, so "
           "nothing would overlap (use the disaggregated layout)")


def _validate_mixing(m: Any) -> None:
    """The mixing ranges (core.mixing_spec, declared once) and what the vLLM engine can serve, at config time."""
    values = dataclasses.asdict(m)
    for key, message in mixing_spec.problems(values) + mixing_spec.engine_problems(values):
        _check(False, f"mixing.{key}", message)
    _check(m.table_slots >= 1, "mixing.table_slots", f"must be >= 1, got {m.table_slots}")


def _check_ring(cfg: Config) -> None:
    """One prompt's group must fit the engine's ring table in one call (core.ring_budget); the fleet cuts a call's
    prompts into enough chunks for the rest."""
    from ngrpo_ray.core.ring_budget import prompts_per_call, slots_per_prompt

    m = cfg.mixing
    rho = mixing_spec.gate_rho(dataclasses.asdict(m))
    for what, group, tokens in (("rollout", cfg.rollout.group_size, cfg.rollout.max_new_tokens),
                                ("evaluation", cfg.eval.n, cfg.eval.max_new_tokens)):
        if what == "evaluation" and not cfg.eval.mixing:
            continue
        _check(prompts_per_call(group, tokens, rho, m.table_slots) != 0, "mixing.table_slots",
               f"({m.table_slots:,}) cannot hold one prompt's {what} group: {group} responses x {tokens} tokens x "
               f"rho {rho} need {slots_per_prompt(group, tokens, rho):,.0f} slots (5% margin)")


def _check_best_metric(cfg: Config) -> None:
    """trainer.best_metric must be a key the validation logs (checked only where there is a validation set)."""
    from ngrpo_ray.training.validation_keys import validation_keys

    allowed = validation_keys(cfg.data.validation, cfg.eval.n)
    if not allowed:
        return
    metric = cfg.trainer.best_metric
    _check(metric.replace("@", "_at_") in allowed, "trainer.best_metric",
           f"{metric!r} is not a key the validation logs (data.validation={cfg.data.validation!r}, eval.n="
           f"{cfg.eval.n}); allowed: {', '.join(allowed)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", to_dict(cfg))
    return out
