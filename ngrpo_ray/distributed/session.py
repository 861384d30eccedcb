"""Everything a training run holds, built in the order that fails fastest: the placement plan (checked against the
cluster) before data, models or an MLflow run are touched; then the run folder and its resume point, the data, the
MLflow run, and the actors (trainer group, rollout fleet, reward scorer) joined by the weight-sync group."""

from __future__ import annotations

import time
from pathlib import Path

import ray

from ngrpo_ray.config import Config, flatten, to_yaml
from ngrpo_ray.data.prompt_set import build_prompt_set
from ngrpo_ray.distributed import checkpointing, cluster_capacity, components, placement, reservation
from ngrpo_ray.distributed.policy_sync import PolicySync
from ngrpo_ray.distributed.ray_init import init_ray
from ngrpo_ray.distributed.recovery import RestartLog
from ngrpo_ray.distributed.reward_scorer import SCORER_CPUS, RewardScorer
from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
from ngrpo_ray.distributed.trainer_group import TrainerGroup
from ngrpo_ray.models.offline import resolve_model, resolve_tokenizer
from ngrpo_ray.planning import format_plan, plan_memory, plan_params
from ngrpo_ray.tracking.mlflow_run import MlflowRun, tracking_uri_for
from ngrpo_ray.training.iteration_log import IterationLog
from ngrpo_ray.training.prompt_order import PromptOrder
from ngrpo_ray.training.run_state import RunState


class Session:
    """Cluster actors, data, the MLflow run, and the run's state."""

    def __init__(self, cfg: Config, resume: bool = False, log=print, memory_plan=None):
        self.cfg, self.log = cfg, log
        self.memory_plan = memory_plan if memory_plan is not None else _memory_plan(cfg, log)
        # One plan seats every trainer rank and engine; a layout the cluster can never hold fails here, in seconds,
        # before data, models or an MLflow run are touched.
        self.plan = placement.plan_placement(cfg)
        self.log(self.plan.describe())
        init_ray(cfg)
        cluster_capacity.check_capacity(self.plan, extra_cpus={"the reward scorer": SCORER_CPUS})
        self.out = Path(cfg.trainer.output_dir).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint, self.state = checkpointing.resume_point(self.out, cfg, resume)
        self._load_data()
        self._open_mlflow()
        self._start_actors()
        self.mixing = components.mixing_params(cfg, self.tokenizer)
        self.order = PromptOrder(len(self.train_set.prompts), cfg.trainer.prompts_per_iteration, cfg.trainer.seed)
        self.history = IterationLog(self.state.history)
        self.log(f"started in {self.startup_s:.0f}s: {len(self.fleet)} engine(s), {cfg.trainer.num_workers} trainer "
                 f"worker(s); {len(self.train_set.prompts)} train prompts"
                 + (f", {len(self.val_set.prompts)} validation prompts" if self.val_set else "")
                 + f"; MLflow run {self.mlflow.run_id} at {self.mlflow.tracking_uri}")

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.base_model = resolve_model(cfg.model.path, cfg.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(
            resolve_tokenizer(cfg.model.tokenizer, self.base_model, cfg.model.cache_dir))
        self.train_set = build_prompt_set(cfg, cfg.data.train, self.tokenizer)
        self.val_set = build_prompt_set(cfg, cfg.data.validation, self.tokenizer) if cfg.data.validation else None

    def _open_mlflow(self) -> None:
        """The MLflow run (the checkpoint's on resume) with the config, the placement plan and the memory plan; a new
        run's state."""
        cfg = self.cfg
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
        if self.memory_plan is not None:  # the plan's figures beside the measured memory/* metrics
            memory_file = self.out / "memory_plan.txt"
            memory_file.write_text(format_plan(self.memory_plan, cfg.tracking.run_name or self.out.name) + "\n")
            self.mlflow.log_artifact(memory_file)
            self.mlflow.log_params(plan_params(self.memory_plan))

    def _start_actors(self) -> None:
        cfg = self.cfg
        longest = max(len(p) for s in (self.train_set, self.val_set) if s for p in s.prompts)
        # Engines always start from the base model (a path that is never pruned, so Ray can restart them from it);
        # on resume the trainer's restored weights are sent to them once the sync group is open (checkpoints carry
        # an HF export only every trainer.hf_export_every iterations).
        policy_path = self.base_model
        t0 = time.perf_counter()
        self.engine_pg = reservation.reserve_engines(cfg, self.plan)  # disaggregated: the engines' own bundles
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # The trainer first: colocated engines are seated on its ranks' GPUs (Ray Train places its own group).
        self.trainer = TrainerGroup(components.trainer_config(cfg, self.base_model, pad, str(self.out / "ray_train"),
                                                              plan=self.plan))
        self.trainer.start()
        self.fleet = RolloutFleet(components.engine_spec(cfg, policy_path, longest), cfg.rollout.num_engines,
                                  policy_version=self.state.policy_version,
                                  max_restarts=cfg.cluster.engine_max_restarts,
                                  restart_timeout_s=cfg.cluster.engine_restart_timeout_s,
                                  actor_options=reservation.engine_actor_options(self.plan, self.engine_pg,
                                                                                 self.trainer.workers))
        kv_tokens = [h["kv_cache_tokens"] for h in self.fleet.start_health if h.get("kv_cache_tokens") is not None]
        if kv_tokens:  # beside the plan's memory_plan.engine_batch_kv_tokens: fewer means preemptions
            self.mlflow.log_params({"engine.kv_cache_tokens": min(kv_tokens)})
        self.restarts = RestartLog(self.fleet, self.mlflow, self.out)
        self.sync = PolicySync(cfg, self.plan, self.trainer, self.fleet, self.log)
        self.fleet.resync = self.sync.resync_engines
        if self.checkpoint is not None:
            self.trainer.load_checkpoint(str(self.checkpoint / "trainer"), "ds")
        self.sync.open_weight_sync()
        if self.checkpoint is not None:
            self.sync.sync_weights(self.state.policy_version)
        self.scorer = RewardScorer.remote(cfg.eval.grade_workers, cfg.eval.grade_timeout_s, cfg.eval.grading)
        self.startup_s = time.perf_counter() - t0

    def total_iterations(self) -> int:
        t = self.cfg.trainer
        return t.epochs * self.order.iterations_per_epoch() if t.epochs else t.iterations

    def close(self, status: str) -> None:
        for closer in (lambda: self.trainer.shutdown(), lambda: self.fleet.shutdown(),
                       lambda: ray.get(self.scorer.close.remote(), timeout=30),
                       lambda: self.engine_pg is not None and ray.util.remove_placement_group(self.engine_pg)):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - shutting down; report, keep closing the rest
                self.log(f"warning: shutdown step failed: {exc!r}")
        self.mlflow.finish(status)


def _memory_plan(cfg: Config, log):
    """The capacity plan for the default card (what `ngrpo train` prints), or None where the model's config.json
    cannot be read before the session resolves it."""
    try:
        return plan_memory(cfg)
    except FileNotFoundError as err:
        log(f"memory plan: not possible ({err})")
        return None
