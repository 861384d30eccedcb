"""The training driver as a recipe: build the run's components, then per iteration
rollout (with DAPO refills) -> score -> advantages -> train -> weight sync -> (validate) -> log -> (checkpoint).

Read `train` top to bottom for one run and `iteration` for one iteration; each step is a component that does one
thing: `session` (builds and holds the actors, data and MLflow run), `sample_and_score` (rollout and grading),
`training.advantage_step`, the trainer group's `train`, `policy_sync`, `validation`, `checkpointing`, `recovery`.
With trainer.async_rollouts, `async_rollouts.AsyncRollouts` replaces `iteration`: it issues the next rollout before
this one's `learn` (the same advantages -> train -> sync -> validate) and waits for it before the weight sync.
The driver holds ObjectRefs of rollout batches and small NumPy arrays (rewards, lengths), never the batches' tensors.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Callable

from ngrpo_ray.config import Config
from ngrpo_ray.distributed import components, dynamic_batch, first_token_task
from ngrpo_ray.distributed.checkpointing import checkpoint_if_due
from ngrpo_ray.distributed.recovery import recover_trainer
from ngrpo_ray.distributed.sample_and_score import Scored, sample_and_score
from ngrpo_ray.distributed.session import Session
from ngrpo_ray.distributed.trainer_config import TrainerRestarted
from ngrpo_ray.distributed.validation import validate, validate_initial_policy
from ngrpo_ray.training.advantage_step import compute_advantages
from ngrpo_ray.training.iteration_metrics import iteration_metrics


def train(cfg: Config, resume: bool = False, log=print, stop_after: int | None = None, memory_plan=None) -> dict:
    """Run (or resume) training. `stop_after` ends cleanly after that many iterations in total (tests, demos);
    `memory_plan`: the capacity plan `ngrpo train` printed (else the session makes it for the default card)."""
    from tqdm import tqdm

    session = Session(cfg, resume, log, memory_plan)
    status = "FAILED"
    total = session.total_iterations()
    end = total if stop_after is None else min(total, stop_after)
    start = session.state.iteration
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `ray job stop` -> KeyboardInterrupt -> clean stop
    try:
        if start == 0 and session.val_set and cfg.trainer.validate_before:
            validate_initial_policy(session)
        bar = tqdm(initial=start, total=end, desc="iterations", unit="it", dynamic_ncols=True)
        run_iteration = iteration
        if cfg.trainer.async_rollouts:  # one-step-off: the next rollout runs during this iteration's update
            from ngrpo_ray.distributed.async_rollouts import AsyncRollouts

            run_iteration = AsyncRollouts(session, end)
        it = start
        while it < end:
            try:
                metrics = run_iteration(session, it)
                best = record_iteration(session, it, metrics, bar.write)
                checkpoint_if_due(session, it, end, best)
            except TrainerRestarted as exc:  # a trainer worker died: back to the last checkpoint
                it = recover_trainer(session, exc)
                bar.n = it
                bar.refresh()
                continue
            it += 1
            bar.update(1)
        if cfg.tracking.plots:
            for plot in session.history.plots(session.out / "plots"):
                session.mlflow.log_artifact(plot, "plots")
        status = "FINISHED" if end == total else "KILLED"
        summary = {"run_id": session.mlflow.run_id, "tracking_uri": session.mlflow.tracking_uri,
                   "iterations": end, "output_dir": str(session.out), "last": session.history.last()}
        (session.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary
    except KeyboardInterrupt:
        status = "KILLED"  # the last checkpoint stays the latest; `--resume` continues in this MLflow run
        log(f"interrupted; resume with --resume (checkpoints in {session.out / 'checkpoints'})")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        session.close(status)


def iteration(session: Session, it: int) -> dict[str, float]:
    """One iteration (0-based `it`); returns the metrics logged at step it + 1."""
    t_start = time.perf_counter()
    problems = batch_problems(session, it)
    t0 = time.perf_counter()
    scored, rollout_info = rollout(session, it, problems, session.state.policy_version)
    return learn(session, it, scored, rollout_info, time.perf_counter() - t0, t_start)


def learn(session: Session, it: int, scored: Scored, rollout_info: dict[str, float], t_rollout: float,
          t_start: float, before_sync: Callable[[], dict[str, float]] | None = None) -> dict[str, float]:
    """The rest of iteration `it` once its rollout is scored: advantages -> train -> weight sync -> (validate).
    `before_sync` (asynchronous rollouts: wait for the rollout in flight) runs between the update and the sync;
    the metrics it returns are logged with the iteration's."""
    cfg, version = session.cfg, session.state.policy_version
    advantages, adv_info = compute_advantages(cfg, scored)
    adv_info.update(rollout_info)
    if cfg.algorithm.first_token_selection:  # Latent-GRPO: per-token advantages, computed next to the batches
        advantages, first_info = first_token_task.apply([c.ref for c in scored.chunks], advantages, scored.rewards,
                                                        cfg.rollout.group_size)
        adv_info.update(first_info)
    t0 = time.perf_counter()
    if session.plan.sleep_engines:
        session.fleet.sleep()  # colocated on GPU: the update gets the engines' GPU memory
    train_metrics = session.trainer.train([c.ref for c in scored.chunks], advantages, version=version + 1)
    t_train = time.perf_counter() - t0
    if before_sync is not None:
        adv_info.update(before_sync())
    t0 = time.perf_counter()
    sent, recv_stats = session.sync.sync_weights(version + 1)
    t_sync = time.perf_counter() - t0
    session.state.policy_version = version + 1

    metrics = iteration_metrics(scored, adv_info, train_metrics, sent, recv_stats, session.state.policy_version,
                                t_rollout, t_train, t_sync)
    if session.val_set and cfg.trainer.validate_every and (it + 1) % cfg.trainer.validate_every == 0:
        metrics.update(validate(session, it + 1))
    metrics.update(session.restarts.metrics())
    session.restarts.log()
    metrics["time/total_s"] = time.perf_counter() - t_start
    return metrics


def batch_problems(session: Session, it: int) -> list[int]:
    """Iteration `it`'s problems (the order is a function of the iteration, so a re-run iteration sees the same
    ones); which problems it saw is appended to prompt_order.jsonl (resume audits)."""
    idx = session.order.batch_at(it)
    with (session.out / "prompt_order.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": it + 1, "problems": [session.train_set.ids[i] for i in idx]}) + "\n")
    session.fleet.iteration = it + 1
    return idx


def rollout(session: Session, it: int, problems: list[int], version: int) -> tuple[Scored, dict[str, float]]:
    """Generate and grade the iteration's groups; with algorithm.dynamic_sampling (DAPO), refill rounds replace
    groups whose rewards are all equal (their counts come back as metrics)."""
    cfg, data = session.cfg, session.train_set
    sampling = components.rollout_sampling(cfg)
    if cfg.algorithm.dynamic_sampling:
        return dynamic_batch.sample_with_signal(cfg, session.fleet, session.scorer, data, problems, it, sampling,
                                                session.mixing, version, log_dir=session.out)
    scored = sample_and_score(session.fleet, session.scorer, [data.prompts[i] for i in problems],
                              [data.golds[i] for i in problems], cfg.rollout.group_size, sampling, session.mixing,
                              version, data.kind)
    return scored, {}


def record_iteration(session: Session, it: int, metrics: dict[str, float], write: Callable[[str], object]) -> bool:
    """Log iteration `it`'s metrics to MLflow and the history, print its line; returns whether it is a new best."""
    session.mlflow.log_metrics(metrics, step=it + 1)
    session.history.add(it + 1, metrics)
    best = session.history.update_best(session.state, session.cfg.trainer.best_metric, it + 1, metrics)
    write(session.history.line(it + 1, metrics))
    return best
