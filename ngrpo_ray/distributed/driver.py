"""The training driver: rollout -> reward -> advantage -> update -> weight sync, once per iteration.

Read `train` top to bottom for one run; `Session.iteration` is one iteration. The driver holds ObjectRefs of rollout
batches and small NumPy arrays (rewards, lengths), never the batches' tensors.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ngrpo_ray.config import Config, flatten, to_yaml
from ngrpo_ray.core.advantages import dr_grpo_advantages, grpo_advantages
from ngrpo_ray.data.prompts import render_prompt
from ngrpo_ray.data.sources import grader_kind, load_problems
from ngrpo_ray.distributed import components, dynamic_batch, first_token_task, placement
from ngrpo_ray.distributed.reward_scorer import RewardScorer
from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.distributed.sample_and_score import Scored, sample_and_score
from ngrpo_ray.distributed.trainer_group import TrainerGroup, TrainerRestarted
from ngrpo_ray.evaluation.report import summarize
from ngrpo_ray.models.offline import resolve_model, resolve_tokenizer
from ngrpo_ray.tracking.mlflow_run import MlflowRun, tracking_uri_for
from ngrpo_ray.training.iteration_log import IterationLog
from ngrpo_ray.training.prompt_order import PromptOrder
from ngrpo_ray.training.run_state import (RunState, check_resumable, latest_checkpoint, load_checkpoint,
                                          save_checkpoint)
from ngrpo_ray.training.validation_keys import per_benchmark


@dataclass
class PromptSet:
    name: str
    prompts: list[list[int]]
    golds: list[str]
    ids: list[str]
    kind: str
    dropped_too_long: int


def build_prompt_set(cfg: Config, name: str, tokenizer: Any) -> PromptSet:
    problems, report = load_problems(name, cfg.data.question_field, cfg.data.answer_field, seed=cfg.data.seed)
    append = {"auto": None, "always": True, "never": False}[cfg.data.append_think]
    prompts, golds, ids, dropped = [], [], [], 0
    for p in problems:
        ids_ = render_prompt(tokenizer, p.question, cfg.data.prompt_template, cfg.data.use_chat_template, append)
        if len(ids_) > cfg.data.max_prompt_tokens:
            dropped += 1  # counted and logged, never silent
            continue
        prompts.append(ids_)
        golds.append(p.answer)
        ids.append(p.id)
    if cfg.data.limit is not None:
        prompts, golds, ids = prompts[: cfg.data.limit], golds[: cfg.data.limit], ids[: cfg.data.limit]
    if not prompts:
        raise ValueError(f"data source '{name}' has no usable prompts ({report}; {dropped} over "
                         f"data.max_prompt_tokens={cfg.data.max_prompt_tokens})")
    return PromptSet(name, prompts, golds, ids, grader_kind(name), dropped)


def compute_advantages(cfg: Config, scored: Scored) -> tuple[torch.Tensor, dict]:
    a = cfg.algorithm
    rewards = torch.as_tensor(scored.rewards, dtype=torch.float32)
    invalid = torch.as_tensor(scored.truncated) if a.mask_truncated else None
    G = cfg.rollout.group_size
    if a.advantage == "dr_grpo" or a.loss_type == "dr_grpo":
        out = dr_grpo_advantages(rewards, G, invalid=invalid)
    else:
        out = grpo_advantages(rewards, G, invalid=invalid)
    adv = out.advantages
    info = {"adv/num_invalid_zeroed": float(out.num_invalid_zeroed),
            "adv/num_degenerate_groups": float(out.num_degenerate_groups)}
    return adv, info


class Session:
    """Everything a training run holds: cluster actors, data, MLflow run, and its state."""

    def __init__(self, cfg: Config, resume: bool = False, log=print):
        self.cfg, self.log = cfg, log
        # One plan seats every trainer rank and engine; a layout the cluster can never hold fails here, in seconds,
        # before data, models or an MLflow run are touched.
        self.plan = placement.plan_placement(cfg)
        self.log(self.plan.describe())
        placement.init_ray(cfg)
        placement.check_capacity(self.plan)
        self.out = Path(cfg.trainer.output_dir).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.state: RunState | None = None
        checkpoint = latest_checkpoint(self.out) if resume else None
        if resume and checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint)
            check_resumable(self.state.config, cfg)
        self.checkpoint = checkpoint

        from transformers import AutoTokenizer

        self.base_model = resolve_model(cfg.model.path, cfg.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(
            resolve_tokenizer(cfg.model.tokenizer, self.base_model, cfg.model.cache_dir))
        self.train_set = build_prompt_set(cfg, cfg.data.train, self.tokenizer)
        self.val_set = build_prompt_set(cfg, cfg.data.validation, self.tokenizer) if cfg.data.validation else None
        longest = max(len(p) for s in (self.train_set, self.val_set) if s for p in s.prompts)
        # Engines always start from the base model (a path that is never pruned, so Ray can restart them from it);
        # on resume the trainer's restored weights are sent to them once the sync group is open (checkpoints carry
        # an HF export only every trainer.hf_export_every iterations).
        policy_path = self.base_model

        self.mlflow = MlflowRun(tracking_uri_for(self.out, cfg.tracking.tracking_uri), cfg.tracking.experiment,
                                run_name=cfg.tracking.run_name or self.out.name,
                                run_id=self.state.mlflow_run_id if self.state else None,
                                artifact_root=self.out / "mlartifacts")
        self.mlflow.log_params(flatten(cfg))
        resolved = self.out / "resolved_config.yaml"
        resolved.write_text(to_yaml(cfg))
        self.mlflow.log_artifact(resolved)
        if self.state is None:
            self.state = RunState(iteration=0, policy_version=0, mlflow_run_id=self.mlflow.run_id, config=flatten(cfg))

        plan_file = self.out / "placement_plan.json"
        placement.write_plan(self.plan, plan_file)
        self.mlflow.log_artifact(plan_file)
        self.mlflow.log_params(placement.plan_params(self.plan))
        t0 = time.perf_counter()
        self.engine_pg = placement.reserve_engines(cfg, self.plan)  # disaggregated: the engines' own bundles
        self.trainer_restarts: list[dict] = []
        self.restarts_logged = 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # The trainer first: colocated engines are seated on its ranks' GPUs (Ray Train places its own group).
        self.trainer = TrainerGroup(components.trainer_config(cfg, self.base_model, pad, str(self.out / "ray_train"),
                                                              plan=self.plan))
        self.trainer.start()
        self.fleet = RolloutFleet(components.engine_spec(cfg, policy_path, longest), cfg.rollout.num_engines,
                                  policy_version=self.state.policy_version,
                                  max_restarts=cfg.cluster.engine_max_restarts,
                                  restart_timeout_s=cfg.cluster.engine_restart_timeout_s,
                                  actor_options=placement.engine_actor_options(self.plan, self.engine_pg,
                                                                               self.trainer.workers))
        self.fleet.resync = self.resync_engines
        if checkpoint is not None:
            self.trainer.load_checkpoint(str(checkpoint / "trainer"), "ds")
        self.open_weight_sync()
        if checkpoint is not None:
            self.sync_weights(self.state.policy_version)
        self.scorer = RewardScorer.remote(cfg.eval.grade_workers, cfg.eval.grade_timeout_s, cfg.eval.grading)
        self.startup_s = time.perf_counter() - t0
        self.mixing = components.mixing_params(cfg, self.tokenizer)
        self.order = PromptOrder(len(self.train_set.prompts), cfg.trainer.prompts_per_iteration, cfg.trainer.seed)
        self.history = IterationLog(self.state.history)
        self.log(f"started in {self.startup_s:.0f}s: {len(self.fleet)} engine(s), {cfg.trainer.num_workers} trainer "
                 f"worker(s); {len(self.train_set.prompts)} train prompts"
                 + (f", {len(self.val_set.prompts)} validation prompts" if self.val_set else "")
                 + f"; MLflow run {self.mlflow.run_id} at {self.mlflow.tracking_uri}")

    def open_weight_sync(self) -> None:
        """(Re)build the sync group: trainer rank 0 plus every engine. Joining closes a member's previous group."""
        endpoint = self.trainer.open_weight_sync(len(self.fleet), timeout_s=self.cfg.cluster.sync_timeout_s)
        joins = self.fleet.join_weight_sync(endpoint.__dict__)
        self.trainer.finish_open_weight_sync()
        ray.get(joins)

    def sync_weights(self, version: int) -> tuple[Any, list]:
        """Send the trainer's weights to every engine as `version`; returns (trainer stats, engine stats).
        Engines Ray restarted since the last look (say, killed during the train step) left the sync group: it is
        rebuilt first, and the restart recorded."""
        t0 = time.perf_counter()
        restarted = self.fleet.find_restarted()
        if restarted:
            self.log(f"engine(s) {restarted} restarted outside a rollout; rebuilding the weight-sync group")
            self.open_weight_sync()
            for engine in restarted:
                self.fleet.record_restart(engine, "between_rollouts", version, version, t0)
        timeout = self.cfg.cluster.sync_timeout_s
        if self.plan.sleep_engines:
            self.fleet.wake_up()  # colocated on GPU: weights and KV cache back before the load and the rollout
        handle = self.trainer.start_sync(version, bucket_mb=self.cfg.cluster.sync_bucket_mb)
        received = self.fleet.receive_weights(version)
        sent = self.trainer.wait(handle, timeout_s=timeout)[0]
        return sent, ray.get(received, timeout=timeout)

    def resync_engines(self, engines: list[int], version: int) -> None:
        """The fleet's hook after engines restarted (they hold the initial model and are outside the sync group,
        which cannot take a new member): rebuild the group and send the current weights, the trainer's, again."""
        self.log(f"engine(s) {engines} restarted; re-syncing the fleet to policy version {version}")
        self.open_weight_sync()
        self.sync_weights(version)

    def recover_trainer(self, error: TrainerRestarted) -> int:
        """Ray Train restarted the trainer group (a worker died): restore the last checkpoint (or the initial model
        when there is none yet), roll the run state back to it, and send those weights to the engines. The
        iterations after that checkpoint are run again (same prompts: the order is a function of the iteration).
        Returns the iteration to continue from."""
        t0 = time.perf_counter()
        failed = self.fleet.iteration
        self.log(f"trainer worker group restarted in iteration {failed} ({error}); restoring the last checkpoint")
        hosts = self.trainer.workers  # where the colocated engines were seated
        self.trainer.recover()
        placement.check_guests_after_restart(self.plan, hosts, self.trainer.workers)
        checkpoint = latest_checkpoint(self.out)
        if checkpoint is not None:
            self.trainer.load_checkpoint(str(checkpoint / "trainer"), "ds")
            self.state = load_checkpoint(checkpoint)
        else:
            self.state = RunState(iteration=0, policy_version=0, mlflow_run_id=self.mlflow.run_id,
                                  config=flatten(self.cfg))
        self.history = IterationLog(self.state.history)
        self.open_weight_sync()  # trainer rank 0 is a new process: the old group is gone
        self.sync_weights(self.state.policy_version)
        self.trainer_restarts.append({
            "kind": "trainer", "iteration": failed, "resumed_from_iteration": self.state.iteration,
            "checkpoint": str(checkpoint) if checkpoint else None, "policy_version": self.state.policy_version,
            "recover_s": round(time.perf_counter() - t0, 3), "time": time.time()})
        self._log_restarts()
        self.log(f"trainer recovered in {time.perf_counter() - t0:.0f}s; continuing from iteration "
                 f"{self.state.iteration + 1} at policy version {self.state.policy_version}")
        return self.state.iteration

    def _log_restarts(self) -> None:
        """restarts.json (this session's engine and trainer restarts) as an artifact, when there are new ones."""
        restarts = self.fleet.restarts + self.trainer_restarts
        if len(restarts) > self.restarts_logged:
            self.restarts_logged = len(restarts)
            path = self.out / "restarts.json"
            path.write_text(json.dumps(sorted(restarts, key=lambda r: r["time"]), indent=2))
            self.mlflow.log_artifact(path)
            self.mlflow.set_tag("fault.engine_restarts", len(self.fleet.restarts))
            self.mlflow.set_tag("fault.trainer_restarts", len(self.trainer_restarts))

    # ------------------------------------------------------------------------------------------------------------
    def total_iterations(self) -> int:
        t = self.cfg.trainer
        return t.epochs * self.order.iterations_per_epoch() if t.epochs else t.iterations

    def iteration(self, it: int) -> dict[str, float]:
        """One iteration (0-based `it`); returns the metrics logged at step it + 1."""
        cfg, version = self.cfg, self.state.policy_version
        t_start = time.perf_counter()
        idx = self.order.batch_at(it)
        with (self.out / "prompt_order.jsonl").open("a") as f:  # which prompts each iteration saw (resume audits)
            f.write(json.dumps({"iteration": it + 1, "problems": [self.train_set.ids[i] for i in idx]}) + "\n")
        self.fleet.iteration = it + 1
        prompts = [self.train_set.prompts[i] for i in idx]
        golds = [self.train_set.golds[i] for i in idx]
        t0 = time.perf_counter()
        ds_info: dict[str, float] = {}
        if cfg.algorithm.dynamic_sampling:  # [options] DAPO: refill the batch with groups that carry signal
            scored, ds_info = dynamic_batch.sample_with_signal(cfg, self.fleet, self.scorer, self.train_set, idx, it,
                                                               components.rollout_sampling(cfg), self.mixing, version,
                                                               log_dir=self.out)
        else:
            scored = sample_and_score(self.fleet, self.scorer, prompts, golds, cfg.rollout.group_size,
                                      components.rollout_sampling(cfg), self.mixing, version, self.train_set.kind)
        t_rollout = time.perf_counter() - t0
        self.fleet.maybe_kill_for_test("train")
        advantages, adv_info = compute_advantages(cfg, scored)
        adv_info.update(ds_info)  # [options]
        if cfg.algorithm.first_token_selection:  # [options] Latent-GRPO: per-token advantages
            advantages, ft_info = first_token_task.apply([c.ref for c in scored.chunks], advantages, scored.rewards,
                                                         cfg.rollout.group_size)
            adv_info.update(ft_info)
        t0 = time.perf_counter()
        if self.plan.sleep_engines:
            self.fleet.sleep()  # colocated on GPU: the update gets the engines' GPU memory
        train_metrics = self.trainer.train([c.ref for c in scored.chunks], advantages, version=version + 1)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        sent, recv_stats = self.sync_weights(version + 1)
        t_sync = time.perf_counter() - t0
        self.state.policy_version = version + 1

        rewards = scored.rewards
        metrics: dict[str, float] = {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "accuracy": float((rewards > 0.5).mean()),
            "response_length/mean": float(scored.length.mean()), "response_length/max": float(scored.length.max()),
            "truncated_fraction": float(scored.truncated.mean()),
            "mixing/mixed_token_fraction": float(scored.mixed_steps.sum() / max(scored.length.sum(), 1)),
            "mixing/responses_mixed_fraction": float((scored.mixed_steps > 0).mean()),
            "policy_version": float(self.state.policy_version),
            "rollout/tokens_per_s": scored.tokens / max(scored.generation_s, 1e-9),
            "time/generation_s": scored.generation_s, "time/reward_s": max(t_rollout - scored.generation_s, 0.0),
            "time/train_s": t_train, "time/sync_s": t_sync,
            "sync/bytes": float(sent.get("bytes", 0) if isinstance(sent, dict) else 0),
        }
        has_mix = scored.mixed_steps > 0
        metrics["reward/mixed_responses"] = float(rewards[has_mix].mean()) if has_mix.any() else float("nan")
        metrics["reward/unmixed_responses"] = float(rewards[~has_mix].mean()) if (~has_mix).any() else float("nan")
        for key, value in scored.cosine.items():
            metrics[f"mixing/cosine_{key}"] = value
        for key, value in scored.grading.items():
            metrics[f"grading/{key}"] = float(value)
        metrics.update(adv_info)
        for key, value in train_metrics.items():
            if isinstance(value, (int, float)):  # "mismatch/...", "rollout_correction/..." keep their own section
                metrics[key if "/" in key else f"train/{key}"] = float(value)
        if recv_stats and isinstance(recv_stats[0], dict) and "seconds" in recv_stats[0]:
            metrics["sync/engine_load_s"] = float(recv_stats[0].get("load_seconds", 0.0))
        if self.val_set and cfg.trainer.validate_every and (it + 1) % cfg.trainer.validate_every == 0:
            metrics.update(self.validate(it + 1))
        metrics["fault/engine_restarts"] = float(len(self.fleet.restarts))  # cumulative over this session
        metrics["fault/trainer_restarts"] = float(len(self.trainer_restarts))
        self._log_restarts()
        metrics["time/total_s"] = time.perf_counter() - t_start
        return metrics

    def validate(self, step: int) -> dict[str, float]:
        """Mean@n / Pass@k on the validation set; the per-sample grades are kept in validation/step_<N>.npy."""
        t0 = time.perf_counter()
        vs, n = self.val_set, self.cfg.eval.n
        mixing = components.mixing_params(self.cfg, self.tokenizer, enabled=self.cfg.eval.mixing)
        scored = sample_and_score(self.fleet, self.scorer, vs.prompts, vs.golds, n, components.eval_sampling(self.cfg),
                                  mixing, self.state.policy_version, vs.kind, purpose="validate")
        correct = scored.correct_matrix(len(vs.prompts), n)
        (self.out / "validation").mkdir(exist_ok=True)
        np.save(self.out / "validation" / f"step_{step}.npy", correct)
        summary = summarize(correct, n_resamples=2000)
        out = {f"val/{key.replace('@', '_at_')}": cell["value"] for key, cell in summary.items()
               if isinstance(cell, dict) and not key.startswith("bootstrap")}
        out["val/mean_at_n_ci_low"] = summary["mean@n"]["ci_low"]
        out["val/mean_at_n_ci_high"] = summary["mean@n"]["ci_high"]
        out.update(per_benchmark(out, self.cfg.data.validation))  # val/<benchmark>/<metric> (trainer.best_metric)
        out["time/validation_s"] = time.perf_counter() - t0
        return out

    def save(self, it: int, hf_export: bool, best: bool = False) -> Path:
        """Checkpoint after iteration `it` (0-based); `hf_export`: with the HF model in model.dtype; `best`: also
        published as checkpoints/best/ (implies the export)."""
        def write_trainer(folder: Path) -> None:
            hf = hf_export or best
            self.trainer.save_checkpoint(str(folder), "ds", hf_dir=str(folder / "hf") if hf else None,
                                         hf_dtype=self.cfg.model.dtype)
            if hf:
                self.tokenizer.save_pretrained(folder / "hf")

        self.state.iteration = it + 1
        self.state.history = self.history.series
        return save_checkpoint(self.out, self.state, write_trainer, keep=self.cfg.trainer.keep_checkpoints, best=best)

    def close(self, status: str) -> None:
        for closer in (lambda: self.trainer.shutdown(), lambda: self.fleet.shutdown(),
                       lambda: ray.get(self.scorer.close.remote(), timeout=30),
                       lambda: self.engine_pg is not None and ray.util.remove_placement_group(self.engine_pg)):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - shutting down; report, keep closing the rest
                self.log(f"warning: shutdown step failed: {exc!r}")
        self.mlflow.finish(status)


def run_iteration(session: Session, it: int, end: int, write) -> None:
    """Iteration `it` (0-based): train, log, print its line, checkpoint when due."""
    cfg = session.cfg
    metrics = session.iteration(it)
    session.mlflow.log_metrics(metrics, step=it + 1)
    session.history.add(it + 1, metrics)
    best = session.history.update_best(session.state, cfg.trainer.best_metric, it + 1, metrics)
    write(session.history.line(it + 1, metrics))
    last = it + 1 == end
    t, step = cfg.trainer, it + 1
    hf_due = bool(t.hf_export_every) and step % t.hf_export_every == 0
    if last or (t.checkpoint_every and step % t.checkpoint_every == 0) or best or hf_due:
        path = session.save(it, hf_export=last or hf_due, best=best)
        if best:
            session.mlflow.set_tag("best_checkpoint", str(path.parent / "best"))
            session.mlflow.set_tag("best_iteration", step)
        session.mlflow.set_tag("latest_checkpoint", str(path))


def train(cfg: Config, resume: bool = False, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) training. `stop_after` ends cleanly after that many iterations in total (tests, demos)."""
    from tqdm import tqdm

    session = Session(cfg, resume, log)
    status = "FAILED"
    total = session.total_iterations()
    end = total if stop_after is None else min(total, stop_after)
    start = session.state.iteration
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `ray job stop` -> KeyboardInterrupt -> clean stop
    try:
        if start == 0 and session.val_set and cfg.trainer.validate_before:
            log("validating the initial policy ...")
            before = session.validate(0)
            session.mlflow.log_metrics(before, step=0)
            session.history.add(0, before)
            log(f"initial policy: val mean@n {before['val/mean_at_n']:.3f} "
                f"[{before['val/mean_at_n_ci_low']:.3f}, {before['val/mean_at_n_ci_high']:.3f}]")
        bar = tqdm(initial=start, total=end, desc="iterations", unit="it", dynamic_ncols=True)
        it = start
        while it < end:
            try:
                run_iteration(session, it, end, bar.write)
            except TrainerRestarted as exc:  # a trainer worker died: back to the last checkpoint
                it = session.recover_trainer(exc)
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
