"""Validation during training: Mean@n / Pass@k of the current policy on the validation set, on the same fleet."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ngrpo_ray.distributed import components
from ngrpo_ray.distributed.sample_and_score import sample_and_score
from ngrpo_ray.evaluation.report import summarize
from ngrpo_ray.training.validation_keys import per_benchmark

if TYPE_CHECKING:
    from ngrpo_ray.distributed.session import Session


def validate(session: "Session", step: int) -> dict[str, float]:
    """Mean@n / Pass@k on the validation set; the per-sample grades are kept in validation/step_<N>.npy."""
    t0 = time.perf_counter()
    cfg, vs, n = session.cfg, session.val_set, session.cfg.eval.n
    mixing = components.mixing_params(cfg, session.tokenizer, enabled=cfg.eval.mixing)
    scored = sample_and_score(session.fleet, session.scorer, vs.prompts, vs.golds, n, components.eval_sampling(cfg),
                              mixing, session.state.policy_version, vs.kind, purpose="validate")
    correct = scored.correct_matrix(len(vs.prompts), n)
    (session.out / "validation").mkdir(exist_ok=True)
    np.save(session.out / "validation" / f"step_{step}.npy", correct)
    summary = summarize(correct, n_resamples=2000)
    out = {f"val/{key.replace('@', '_at_')}": cell["value"] for key, cell in summary.items()
           if isinstance(cell, dict) and not key.startswith("bootstrap")}
    out["val/mean_at_n_ci_low"] = summary["mean@n"]["ci_low"]
    out["val/mean_at_n_ci_high"] = summary["mean@n"]["ci_high"]
    out.update(per_benchmark(out, cfg.data.validation))  # val/<benchmark>/<metric> (trainer.best_metric)
    out["time/validation_s"] = time.perf_counter() - t0
    return out


def validate_initial_policy(session: "Session") -> None:
    """Step 0 of a new run (trainer.validate_before): the policy before any update, logged like any validation."""
    session.log("validating the initial policy ...")
    before = validate(session, 0)
    session.mlflow.log_metrics(before, step=0)
    session.history.add(0, before)
    session.log(f"initial policy: val mean@n {before['val/mean_at_n']:.3f} "
                f"[{before['val/mean_at_n_ci_low']:.3f}, {before['val/mean_at_n_ci_high']:.3f}]")
