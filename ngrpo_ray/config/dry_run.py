"""A CPU dry run of a preset: the config resolves, its data loads, and its model config is readable when present.

Nothing is trained and no weights are loaded. Items that need what this machine may lack (a hub, a user-supplied
file, a model not downloaded) are reported as skipped with the reason, never as passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ngrpo_ray.config.schema import Config


@dataclass(frozen=True)
class DryRunItem:
    what: str
    status: str  # "ok", "skipped" or "failed"
    detail: str


def _check_data(role: str, name: str) -> DryRunItem:
    from ngrpo_ray.data.registry import DATASETS
    from ngrpo_ray.data.sources import load_problems

    try:
        problems, report = load_problems(name)
    except (ValueError, FileNotFoundError) as err:
        needs_user_source = name in DATASETS and DATASETS[name].relative_path is None
        return DryRunItem(f"{role} {name}", "skipped" if needs_user_source else "failed", str(err))
    if not problems:
        return DryRunItem(f"{role} {name}", "failed", "no problems after loading")
    return DryRunItem(f"{role} {name}", "ok", f"{len(problems)} problems from {report.path}")


def find_model_folder(path: str, cache_dir: str = "~/.cache/ngrpo_ray/models",
                      prepare_demo: bool = True) -> tuple[Path | None, str]:
    """The local folder holding `path`'s config.json, or (None, why not): resolved as train / eval / bench resolve
    it (the offline demo model is prepared only when `prepare_demo`), then the local HF cache; never the hub."""
    from ngrpo_ray.models.offline import DEMO_MODEL, resolve_model

    if path == DEMO_MODEL and not prepare_demo:
        return None, "the demo model is not prepared here (prepare_demo=False)"
    folder = Path(resolve_model(path, cache_dir))
    if folder.exists():
        return folder, "local folder"
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:  # e.g. another run's checkpoint folder, made by running that run first
        return None, "local folder not present yet (made by an earlier run)"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if not isinstance(cached, str):
        return None, "hub model not in the local HF cache (no hub here)"
    return Path(cached).parent, "local HF cache"


def _check_model(path: str, cache_dir: str) -> DryRunItem:
    folder, why = find_model_folder(path, cache_dir)
    if folder is None:
        return DryRunItem(f"model {path}", "skipped", why)
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        return DryRunItem(f"model {path}", "failed", f"config unreadable: {err}")
    return DryRunItem(f"model {path}", "ok", f"{mc.model_type}, vocab {mc.vocab_size}, hidden {mc.hidden_size}, "
                                              f"{mc.num_hidden_layers} layers")


def dry_run(cfg: Config) -> list[DryRunItem]:
    items = [DryRunItem("hardware", "ok", f"written for: {cfg.model.gpus_expected}")]
    items.append(_check_data("train", cfg.data.train))
    if cfg.data.validation:
        items.append(_check_data("validation", cfg.data.validation))
    for name in cfg.eval.benchmarks:
        if name != cfg.data.validation:
            items.append(_check_data("eval", name))
    items.append(_check_model(cfg.model.path, cfg.model.cache_dir))
    items.append(_check_placement(cfg))
    return items


def _check_placement(cfg: Config) -> DryRunItem:
    """The layout plan the driver will reserve (no cluster needed to plan it)."""
    from ngrpo_ray.distributed.placement import PlacementInfeasibleError, plan_placement

    try:
        plan = plan_placement(cfg)
    except (PlacementInfeasibleError, AssertionError) as err:
        return DryRunItem("placement", "failed", str(err))
    return DryRunItem("placement", "ok", plan.describe().replace("\n", "\n            "))


def format_dry_run(items: list[DryRunItem]) -> str:
    return "\n".join(f"  [{i.status:>7}] {i.what}: {i.detail}" for i in items)
