"""Checkpoints of a training run: where a resumed run starts, when a checkpoint is due, and writing one (the
trainer's DeepSpeed state on every rank, the run state, and an HF export when asked). The files' layout and the
run state are `training.run_state`'s."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ngrpo_ray.config import Config
from ngrpo_ray.training.run_state import RunState, check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from ngrpo_ray.distributed.session import Session


def resume_point(out: Path, cfg: Config, resume: bool) -> tuple[Path | None, RunState | None]:
    """(latest checkpoint, its run state) with --resume, after checking the config may continue it; (None, None)
    for a new run."""
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    state = None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        check_resumable(state.config, cfg)
    return checkpoint, state


def checkpoint_if_due(session: "Session", it: int, end: int, best: bool) -> None:
    """After iteration `it` (0-based): the last one, every trainer.checkpoint_every, a new best, or an HF export due
    (every trainer.hf_export_every; the last iteration always exports)."""
    t, step = session.cfg.trainer, it + 1
    last = step == end
    hf_due = bool(t.hf_export_every) and step % t.hf_export_every == 0
    if last or (t.checkpoint_every and step % t.checkpoint_every == 0) or best or hf_due:
        path = save(session, it, hf_export=last or hf_due, best=best)
        if best:
            session.mlflow.set_tag("best_checkpoint", str(path.parent / "best"))
            session.mlflow.set_tag("best_iteration", step)
        session.mlflow.set_tag("latest_checkpoint", str(path))


def save(session: "Session", it: int, hf_export: bool, best: bool = False) -> Path:
    """Checkpoint after iteration `it` (0-based); `hf_export`: with the HF model in model.dtype; `best`: also
    published as checkpoints/best/ (implies the export)."""
    def write_trainer(folder: Path) -> None:
        hf = hf_export or best
        session.trainer.save_checkpoint(str(folder), "ds", hf_dir=str(folder / "hf") if hf else None,
                                        hf_dtype=session.cfg.model.dtype)
        if hf:
            session.tokenizer.save_pretrained(folder / "hf")

    session.state.iteration = it + 1
    session.state.history = session.history.series
    return save_checkpoint(session.out, session.state, write_trainer, keep=session.cfg.trainer.keep_checkpoints,
                           best=best)
