"""Driver-side checkpoint state, written atomically, and the resume compatibility check.

Layout under `trainer.output_dir`:
    checkpoints/iter_000004/driver_state.json   this file's content (iteration, policy version, MLflow run id, ...)
    checkpoints/iter_000004/rng.pt              Python / NumPy / torch RNG states of the driver
    checkpoints/iter_000004/trainer/            the trainer group's own files (DeepSpeed state, HF model)
    checkpoints/latest                          the name of the last complete checkpoint
    checkpoints/best/                           driver_state.json and trainer/hf of the best validation value so far:
                                                outside the rolling iter_* folders, so pruning never removes it;
                                                replaced (atomically, by rename) when a better value comes
A checkpoint folder is built under a temporary name and renamed when complete, and `latest` is replaced after that,
so a crash mid-write leaves the previous checkpoint as the latest. Only the newest `keep` iter_* folders stay.
The HF export (trainer/hf, in the model's dtype) is not in every checkpoint: see trainer.hf_export_every.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ngrpo_ray.config import Config, flatten

# Keys that may change between a run and its resume (how long, where, how it is observed); everything else must match.
RESUMABLE_CHANGES = ("trainer.iterations", "trainer.epochs", "trainer.validate_every", "trainer.checkpoint_every",
                     "trainer.hf_export_every", "trainer.keep_checkpoints",
                     "trainer.async_rollouts", "trainer.max_staleness", "trainer.output_dir", "tracking.", "cluster.", "eval.", "rollout.num_engines",
                     "rollout.gpu_memory_utilization", "rollout.kv_cache_space_gib", "rollout.engine_cpus",
                     "rollout.engine_gpus", "model.cache_dir", "model.gpus_expected")


@dataclass
class RunState:
    iteration: int  # iterations completed
    policy_version: int
    mlflow_run_id: str
    config: dict[str, Any]  # flattened resolved config of the run
    best_value: float | None = None
    best_iteration: int | None = None
    history: dict[str, list[float]] = field(default_factory=dict)  # small per-iteration series for plots


class ResumeMismatch(RuntimeError):
    pass


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir).expanduser() / "checkpoints"


def best_checkpoint(output_dir: str | Path) -> Path | None:
    path = checkpoint_root(output_dir) / BEST
    return path if (path / "driver_state.json").exists() else None


def save_checkpoint(output_dir: str | Path, state: RunState, write_trainer: Callable[[Path], None] | None = None,
                    keep: int = 2, best: bool = False) -> Path:
    """Write checkpoint iter_<state.iteration>, make it the latest, prune old ones; with `best`, also publish its
    driver state and HF export as checkpoints/best/."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{state.iteration:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if write_trainer is not None:
        write_trainer(tmp / "trainer")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp / "rng.pt")
    (tmp / "driver_state.json").write_text(json.dumps(asdict(state), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    if best:
        _publish_best(root, final)
    _prune(root, keep)
    return final


BEST = "best"


def _publish_best(root: Path, checkpoint: Path) -> None:
    """checkpoints/best <- the checkpoint's driver_state.json and trainer/hf, as hard links (no second copy of the
    weights on disk; they outlive the iter_* folder's pruning)."""
    tmp, old, best = root / ".best.tmp", root / ".best.old", root / BEST
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    hf = checkpoint / "trainer" / "hf"
    if hf.is_dir():
        shutil.copytree(hf, tmp / "trainer" / "hf", copy_function=_link_or_copy)
    shutil.copy2(checkpoint / "driver_state.json", tmp / "driver_state.json")
    (tmp / "source").write_text(checkpoint.name)
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    marker = checkpoint_root(output_dir) / "latest"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if (path / "driver_state.json").exists() else None


def load_checkpoint(path: Path, restore_rng: bool = True) -> RunState:
    state = RunState(**json.loads((path / "driver_state.json").read_text()))
    if restore_rng and (path / "rng.pt").exists():
        rng = torch.load(path / "rng.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return state


def check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """Raise ResumeMismatch naming every key whose value differs, except those allowed to change."""
    now = flatten(cfg)
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUMABLE_CHANGES):
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} != config {now.get(key)!r}")
    if diffs:
        raise ResumeMismatch("the checkpoint does not match this config; differing keys:\n  " + "\n  ".join(diffs)
                             + "\n(start a new run with another trainer.output_dir, or resume with the original config)")
