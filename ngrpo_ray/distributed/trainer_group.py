"""The trainer: a long-lived Ray Train ``TorchTrainer`` worker group running DeepSpeed, driven one command at a time.

Design. ``TorchTrainer.fit()`` runs ``train_loop_per_worker`` to completion, but RL needs workers that persist across
iterations (the model and optimizer state stay in place) and take new rollouts each iteration. So the loop function
is a command loop: each rank blocks on a small async Ray actor (``_CommandChannel``) for its next command, runs it,
and posts its result back to the same actor; the driver runs ``fit()`` in a background thread and talks to the
channel. Commands carry ``ObjectRef``s of rollout batches (nested in a list, so Ray does not resolve them on the
way), and each worker fetches them itself: tensors never pass through the driver. Results (metrics, a state dict
for checkpoints) come back through the channel rather than ``ray.train.report``, whose metrics this Ray version only
returns with a checkpoint at the end of ``fit()`` (``Result.metrics`` was None in a quick test), which is useless for
per-iteration logging. What ``TorchTrainer`` still gives us: placement of the workers (CPU or GPU bundles),
``torch.distributed`` set up on the right backend (gloo on CPU, NCCL on GPU) with rank/world/local-rank env vars,
failure reporting, and the same entry point as every other Ray Train job (cluster YAML / KubeRay unchanged).

A command that fails on one rank returns its traceback; the driver raises ``TrainerGroupError`` with it. A worker
that dies (killed, out of memory) makes Ray Train restart the whole group (``max_failures`` times): pending waits
raise ``TrainerRestarted`` and the caller calls ``recover()`` and restores its last checkpoint (see the channel's
generations). Once the restarts are used up the fit thread dies and every pending wait raises instead of hanging.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import ray
import torch

from ngrpo_ray.core.losses import PolicyLossConfig
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.distributed.deepspeed_config import DeepSpeedSettings
from ngrpo_ray.distributed.train_step import StepSettings, TrainSequence
from ngrpo_ray.distributed.weight_sync import SyncEndpoint


class TrainerGroupError(RuntimeError):
    """A trainer command failed on some rank, or the worker group died."""


class TrainerRestarted(TrainerGroupError):
    """Ray Train restarted the worker group (a worker died): the new workers hold the initial model until
    ``TrainerGroup.recover()`` and the caller restore the last checkpoint."""


@dataclass
class TrainerGroupConfig:
    model_path: str  # HF directory of the initial policy (and of the reference model)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # From the placement plan (placement.plan_placement): Ray Train's resources_per_worker and placement strategy.
    # None: {"CPU": cpus_per_worker} (+ one GPU when use_gpu).
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: str = "PACK"
    start_timeout_s: float = 600.0  # every worker must have started (its bundle placed) by then: cluster.placement_timeout_s
    torch_threads: int = 1  # per worker on CPU; keep the product with num_workers below the core count
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    step: StepSettings = field(default_factory=StepSettings)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    ref_model: bool | None = None  # None: load it only when loss.beta != 0
    gradient_checkpointing: bool = False  # HF activation checkpointing (non-reentrant) of the policy's layers
    collective_timeout_s: float = 600.0
    command_timeout_s: float = 3600.0
    max_failures: int = 0  # worker-group restarts Ray Train may make after a worker dies (FailureConfig)
    sync_backend: str = "auto"  # cluster.sync_backend (weight_sync.choose_sync_backend)  [options: sync_backend]
    seed: int = 0
    storage_path: str | None = None  # Ray Train's run folder; a temp dir by default


# ------------------------------------------------------------------------------------------------ command channel


class CommandChannel:
    """Per-rank command queues and per-command result slots (async actor: waits do not block each other).

    Generations: Ray Train restarts the whole worker group after a worker dies (FailureConfig). Each new worker
    registers and gets the group's new generation; commands carry the generation the driver knows. A command from
    before the restart is dropped unseen, a worker of a replaced group takes nothing more, and
    ``put`` refuses commands for an old generation, so nothing runs on a restarted group (which holds the initial
    model) until the driver has seen the restart and restored the last checkpoint."""

    def __init__(self, world_size: int):
        self.queues: list[collections.deque] = [collections.deque() for _ in range(world_size)]
        self.ready = [asyncio.Condition() for _ in range(world_size)]
        self.attempts = [0] * world_size
        self.generation = 0
        self.results: dict[int, dict[int, Any]] = {}
        self.events: dict[int, asyncio.Event] = {}

    def _event(self, cmd_id: int) -> asyncio.Event:
        return self.events.setdefault(cmd_id, asyncio.Event())

    async def register(self, rank: int) -> int:
        """A worker (re)started: its generation (0 for the first group, 1 after one restart, ...)."""
        self.attempts[rank] += 1
        self.generation = max(self.generation, self.attempts[rank] - 1)
        return self.attempts[rank] - 1

    async def get_generation(self) -> int:
        return self.generation

    async def registered(self) -> int:
        """How many ranks have started (Ray placed their bundles and ran the loop)."""
        return sum(1 for a in self.attempts if a > 0)

    async def put(self, ranks: list[int], command: dict) -> bool:
        if command["generation"] != self.generation:
            return False  # the group restarted since the driver last looked
        for r in ranks:
            async with self.ready[r]:
                self.queues[r].append(command)
                self.ready[r].notify_all()
        return True

    async def next_command(self, rank: int, generation: int) -> dict:
        queue = self.queues[rank]
        async with self.ready[rank]:
            while True:
                while queue and queue[0]["generation"] < generation:
                    queue.popleft()  # meant for the group before a restart
                if queue and queue[0]["generation"] == generation == self.generation:
                    return queue.popleft()
                await self.ready[rank].wait()  # empty, or this worker's group was replaced (it is being killed)

    async def put_result(self, cmd_id: int, rank: int, expected: int, result: Any) -> None:
        slot = self.results.setdefault(cmd_id, {})
        slot[rank] = result
        if len(slot) == expected:
            self._event(cmd_id).set()

    async def wait_results(self, cmd_id: int, timeout_s: float, generation: int) -> Any:
        """The results, None on timeout, or "restarted" when the group restarted after the command was sent."""
        try:
            await asyncio.wait_for(self._event(cmd_id).wait(), timeout_s)
        except asyncio.TimeoutError:
            return "restarted" if self.generation > generation else None
        self.events.pop(cmd_id, None)
        return self.results.pop(cmd_id)


_CommandChannel = ray.remote(num_cpus=0)(CommandChannel)  # an async actor: waits do not block each other


# ----------------------------------------------------------------------------------------------- batch adapters


def sequences_from_batches(batches: Sequence[Any], advantages: Any) -> list[TrainSequence]:
    """Flatten rollout batches (in order) into TrainSequences with global indices and their advantages.

    Accepts a ``core.rollout_batch.RolloutBatch`` (``prompt_ids`` and ``records()``), or an object with per-field lists
    (``response_ids``, ``logprobs``, ``mixed_mask``, ``cand_ids``, ``alpha``), or a dict {"prompts", "records"}.
    ``advantages``: [N] tensor (one per sequence) or a list of N tensors ([] or [T_i]).
    """
    prompts: list[torch.Tensor] = []
    records: list[ResponseRecord] = []
    for b in batches:
        if isinstance(b, dict):
            prompts += list(b["prompts"])
            records += list(b["records"])
        elif hasattr(b, "records"):  # core.rollout_batch.RolloutBatch: records() is a method
            prompts += list(b.prompt_ids)
            records += list(b.records() if callable(b.records) else b.records)
        else:
            for i in range(len(b.response_ids)):
                prompts.append(torch.as_tensor(b.prompt_ids[i]))
                records.append(ResponseRecord(
                    response_ids=torch.as_tensor(b.response_ids[i]), logprobs=torch.as_tensor(b.logprobs[i]),
                    mixed_mask=torch.as_tensor(b.mixed_mask[i]), cand_ids=torch.as_tensor(b.cand_ids[i]),
                    alpha=torch.as_tensor(b.alpha[i])))
    if advantages is None:  # log-prob passes need none
        adv: list = [0.0] * len(records)
    elif isinstance(advantages, torch.Tensor) and advantages.dim() == 0:
        adv = [advantages]
    else:
        adv = list(advantages)
    if len(adv) != len(records):
        raise TrainerGroupError(f"{len(adv)} advantages for {len(records)} sequences")
    return [TrainSequence(prompt_ids=torch.as_tensor(p).long(), record=r,
                          advantage=torch.as_tensor(adv[i], dtype=torch.float32),
                          index=i)
            for i, (p, r) in enumerate(zip(prompts, records))]


def _resolve(x: Any) -> Any:
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


# ---------------------------------------------------------------------------------------------------- the worker


class _PolicyWorker:
    """State of one rank: the DeepSpeed engine, the optional reference model, the weight-sync group (rank 0)."""

    def __init__(self, cfg: TrainerGroupConfig):
        import deepspeed
        from transformers import AutoModelForCausalLM

        from ngrpo_ray.distributed.deepspeed_config import (
            build_config, build_optimizer, build_scheduler, init_distributed)

        torch.set_num_threads(max(1, cfg.torch_threads))
        self.cfg = cfg
        init_distributed(cfg.use_gpu)
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg.seed)
        dtype = torch.bfloat16 if cfg.deepspeed.dtype == "bf16" else torch.float32
        # Loaded in the training dtype: with bf16, DeepSpeed keeps the fp32 master weights in its optimizer (ZeRO >= 1)
        # and no full fp32 copy of the model is ever built per worker (28 GB for a 7B model).
        model = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        ds_cfg = build_config(cfg.deepspeed, cfg.step.micro_batches, self.world)
        opt = build_optimizer(cfg.deepspeed, model.parameters())
        sched = build_scheduler(cfg.deepspeed, opt)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        self.device = next(self.engine.module.parameters()).device
        want_ref = cfg.ref_model if cfg.ref_model is not None else cfg.loss.beta != 0.0
        self.ref = None
        if want_ref:
            self.ref = AutoModelForCausalLM.from_pretrained(cfg.model_path, dtype=dtype).to(self.device).eval()
            self.ref.requires_grad_(False)
        self.weight_group = None
        self.version = 0

    # -- commands ---------------------------------------------------------------------------------------------
    def ping(self) -> dict:
        """Who and where: colocated engines are seated next to a rank by its node_id and gpu_ids."""
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "world": self.world, "device": str(self.device), "pid": os.getpid(),
                "node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]}

    def _local(self, batch_refs: list, advantages: Any) -> tuple[list[TrainSequence], list[int]]:
        batches = [_resolve(r) for r in batch_refs]
        seqs = sequences_from_batches(batches, _resolve(advantages))
        return seqs[self.rank:: self.world], [s.index for s in seqs]

    def train(self, batch_refs: list, advantages: Any, version: int | None = None,
              loss: PolicyLossConfig | None = None, step: StepSettings | None = None) -> dict:
        from ngrpo_ray.distributed.deepspeed_config import loss_scale_for_deepspeed
        from ngrpo_ray.distributed.train_step import train_on_sequences

        start = time.monotonic()
        step = step or self.cfg.step
        if step.micro_batches != self.engine.gradient_accumulation_steps():
            # DeepSpeed's accumulation boundary must match the micro-batches we run per optimizer step
            self.engine.set_train_batch_size(step.micro_batches * self.world)
        local, all_idx = self._local(batch_refs, advantages)
        metrics = train_on_sequences(self.engine, local, all_idx, step, loss or self.cfg.loss, self.ref,
                                     loss_scale=loss_scale_for_deepspeed(self.world, step.micro_batches),
                                     grad_norm_fn=self.engine.get_global_grad_norm)
        metrics["lr"] = float(self.engine.get_lr()[0]) if self.engine.get_lr() else self.cfg.deepspeed.lr
        metrics["train_seconds"] = time.monotonic() - start
        self.version = version if version is not None else self.version + 1
        metrics["policy_version"] = float(self.version)
        return metrics

    def logprobs(self, batch_refs: list, use_records: bool = True) -> list[tuple[int, torch.Tensor]]:
        from ngrpo_ray.distributed.train_step import _agreed_count, response_logprobs

        local, _ = self._local(batch_refs, None)
        model = self.engine.module
        model.eval()
        out = []
        # ZeRO-3: every rank makes as many forward passes as the busiest (repeats of its first sequence, dropped)
        passes = list(local) + [local[0]] * (_agreed_count(len(local), model) - len(local))
        with torch.no_grad():
            for s in passes:
                tb = response_logprobs(model, [s.prompt_ids], [s.record], self.cfg.step.temperature,
                                       self.cfg.step.pad_id, use_records=use_records, noise_std=self.cfg.step.noise_std,
                                       chunk_tokens=self.cfg.step.logprob_chunk_tokens)
                out.append((s.index, tb.logp[0, : len(s.record)].float().cpu()))
        out = out[: len(local)]
        model.train()
        return out

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
        """Full (gathered under ZeRO-3) parameters in `dtype` on rank 0; None elsewhere. Every rank must run it."""
        from ngrpo_ray.distributed.weight_sync import _gathered

        params = list(self.engine.module.named_parameters())
        with _gathered([p for _, p in params], self.cfg.deepspeed.zero_stage == 3):
            if self.rank != 0:
                return None
            return {n: p.detach().to(dtype).cpu().clone() for n, p in params}

    def load_state_dict(self, state: Any) -> None:
        """Overwrite the parameters (e.g. reset in tests). Stage 0-2 only: ZeRO-1/2 keep fp32 master copies."""
        state = _resolve(state)
        if self.cfg.deepspeed.zero_stage != 0 or self.cfg.deepspeed.dtype != "fp32":
            opt = self.engine.optimizer
            if not hasattr(opt, "refresh_fp32_params") and self.cfg.deepspeed.zero_stage > 0:
                raise TrainerGroupError("load_state_dict under ZeRO needs the DeepSpeed checkpoint API")
        with torch.no_grad():
            for n, p in self.engine.module.named_parameters():
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))
        if self.cfg.deepspeed.zero_stage in (1, 2):
            self.engine.optimizer.refresh_fp32_params()  # copy model params into the fp32 master partitions

    def sync_address(self) -> dict:
        from ngrpo_ray.distributed.weight_sync import free_port, node_ip

        host = node_ip()
        return {"host": host, "port": free_port(host)}

    def sync_join(self, endpoint: dict) -> dict:
        from ngrpo_ray.distributed.weight_sync import WeightGroup

        if self.rank == 0:
            if self.weight_group is not None:
                self.weight_group.close()
            self.weight_group = WeightGroup(SyncEndpoint(**endpoint), rank=0)
        return {"ok": True}

    def sync_weights(self, version: int, bucket_mb: float, send_dtype: str | None) -> dict:
        from ngrpo_ray.distributed.weight_sync import send_weights

        if self.rank == 0 and self.weight_group is None:
            raise TrainerGroupError("sync_weights before open_weight_sync")
        dtype = getattr(torch, send_dtype) if send_dtype else None
        stats = send_weights(self.weight_group if self.rank == 0 else None, self.engine.module, version,
                             bucket_mb=bucket_mb, send_dtype=dtype, zero3=self.cfg.deepspeed.zero_stage == 3)
        self.version = version
        return stats.__dict__

    def raw_broadcast(self, nbytes: int, chunk_mb: float | None) -> dict:
        from ngrpo_ray.distributed.weight_sync import raw_broadcast_seconds

        if self.rank != 0:
            return {}
        return {"seconds": raw_broadcast_seconds(self.weight_group, nbytes, chunk_mb)}

    def save_checkpoint(self, path: str, tag: str, hf_dir: str | None = None, hf_dtype: str = "float32") -> dict:
        """DeepSpeed checkpoint (model, optimizer, scheduler; every rank) and, when asked, HF weights from rank 0 in
        `hf_dtype` (the model's dtype: a bf16 run exports bf16, half the bytes of fp32)."""
        self.engine.save_checkpoint(path, tag=tag, client_state={"policy_version": self.version})
        if hf_dir:
            dtype = getattr(torch, hf_dtype)
            sd = self.state_dict(dtype)
            if self.rank == 0:
                module = self.engine.module
                module.config.dtype = dtype  # config.json names the dtype the weights are stored in
                module.save_pretrained(hf_dir, state_dict=sd, safe_serialization=True)
        return {"ok": True}

    def load_checkpoint(self, path: str, tag: str) -> dict:
        _, client = self.engine.load_checkpoint(path, tag=tag)
        self.version = int((client or {}).get("policy_version", self.version))
        return {"policy_version": self.version}


def _worker_loop(config: dict) -> None:
    """``train_loop_per_worker``: build the worker, then serve commands until "stop"."""
    import ray.train

    channel = config["channel"]
    cfg: TrainerGroupConfig = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    generation = ray.get(channel.register.remote(rank))  # first thing: the driver learns of a restart at once
    worker: _PolicyWorker | None = None
    try:
        worker = _PolicyWorker(cfg)
    except Exception:
        init_error = traceback.format_exc()
    else:
        init_error = None
    while True:
        cmd = ray.get(channel.next_command.remote(rank, generation))
        if cmd["op"] == "stop":
            ray.get(channel.put_result.remote(cmd["id"], rank, len(cmd["ranks"]), {"ok": True}))
            return
        try:
            if worker is None:
                raise TrainerGroupError(f"worker init failed:\n{init_error}")
            result = {"ok": True, "value": getattr(worker, cmd["op"])(**cmd["kwargs"])}
        except Exception as exc:
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        ray.get(channel.put_result.remote(cmd["id"], rank, len(cmd["ranks"]), result))


# ---------------------------------------------------------------------------------------------------- the driver


class TrainerGroup:
    """Driver-side handle. ``start()`` once, then ``train(refs, advantages)`` per iteration, ``shutdown()`` at the end."""

    def __init__(self, cfg: TrainerGroupConfig):
        self.cfg = cfg
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._fit_error: BaseException | None = None
        self.channel = None
        self.sync_endpoint: SyncEndpoint | None = None
        self.startup_seconds = 0.0
        self.generation = 0  # the worker group's restarts the driver has seen and recovered from
        self._test_killed: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> "TrainerGroup":
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        start = time.monotonic()
        cfg = self.cfg
        self.channel = _CommandChannel.remote(cfg.num_workers)
        resources = dict(cfg.resources_per_worker or {"CPU": cfg.cpus_per_worker})
        if cfg.use_gpu:
            resources.setdefault("GPU", 1)
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"channel": self.channel, "cfg": cfg},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker=resources,
                                         placement_strategy=cfg.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo",
                                     timeout_s=int(cfg.collective_timeout_s)),
            run_config=RunConfig(name=f"ngrpo-trainer-{uuid.uuid4().hex[:12]}",  # id(self) can be reused: names must not
                                 storage_path=cfg.storage_path or tempfile.mkdtemp(prefix="ngrpo_train_"),
                                 failure_config=FailureConfig(max_failures=cfg.max_failures)),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # surfaced by _wait
                self._fit_error = exc

        self._thread = threading.Thread(target=fit, name="ngrpo-trainer-fit", daemon=True)
        self._thread.start()
        self._wait_started(resources)
        self.workers = self._call("ping")
        self.startup_seconds = time.monotonic() - start
        return self

    def _wait_started(self, resources: dict) -> None:
        """Every rank registers first thing: until then Ray is still placing the group. Fail after start_timeout_s
        with the numbers instead of letting the first command wait command_timeout_s."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while True:
            started = ray.get(self.channel.registered.remote())
            if started == self.cfg.num_workers:
                return
            if self._thread is not None and not self._thread.is_alive():
                raise TrainerGroupError(f"the trainer worker group did not start: {self._fit_error!r}")
            if time.monotonic() > deadline:
                raise TrainerGroupError(
                    f"only {started} of {self.cfg.num_workers} trainer workers started within "
                    f"{self.cfg.start_timeout_s:g} s (cluster.placement_timeout_s); each asks Ray for {resources}. "
                    f"Cluster available: {ray.available_resources()}")
            time.sleep(0.5)

    def shutdown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            try:
                self._call("stop", timeout_s=60)
            except TrainerGroupError:
                pass
            self._thread.join(timeout=60)
        if self.channel is not None:
            ray.kill(self.channel)
            self.channel = None

    def __enter__(self) -> "TrainerGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- command plumbing ---------------------------------------------------------------------------------------
    def submit(self, op: str, ranks: Sequence[int] | None = None, **kwargs) -> tuple[int, list[int]]:
        ranks = list(range(self.cfg.num_workers)) if ranks is None else list(ranks)
        cmd_id = next(self._ids)
        command = {"id": cmd_id, "op": op, "kwargs": kwargs, "ranks": ranks, "generation": self.generation}
        if not ray.get(self.channel.put.remote(ranks, command)):
            raise TrainerRestarted(f"the trainer worker group restarted before command {cmd_id} ({op}) was sent")
        return cmd_id, ranks

    def wait(self, handle: tuple[int, list[int]], timeout_s: float | None = None) -> list[Any]:
        """Results in rank order; raises if any rank failed, the group died or restarted, or the timeout passed."""
        cmd_id, ranks = handle
        deadline = time.monotonic() + (timeout_s or self.cfg.command_timeout_s)
        while True:
            got = ray.get(self.channel.wait_results.remote(cmd_id, 1.0, self.generation))
            if got == "restarted":
                raise TrainerRestarted(f"the trainer worker group restarted while running command {cmd_id} "
                                       "(a worker died); its result is lost")
            if got is not None:
                break
            if self._thread is not None and not self._thread.is_alive():
                raise TrainerGroupError(f"trainer worker group stopped while running command {cmd_id}: "
                                        f"{self._fit_error!r}")
            if time.monotonic() > deadline:
                raise TrainerGroupError(f"trainer command {cmd_id} timed out after {timeout_s}s")
        out = []
        for r in ranks:
            res = got[r]
            if not res.get("ok", False):
                raise TrainerGroupError(f"trainer rank {r} failed: {res.get('error')}\n{res.get('traceback', '')}")
            out.append(res.get("value"))
        return out

    def _call(self, op: str, ranks: Sequence[int] | None = None, timeout_s: float | None = None, **kwargs) -> list:
        return self.wait(self.submit(op, ranks, **kwargs), timeout_s)

    def recover(self) -> int:
        """After ``TrainerRestarted``: adopt the new worker group (every rank answers a ping). Its workers hold the
        initial model and a fresh optimizer; the caller restores the last checkpoint (``load_checkpoint``) and rebuilds
        the weight-sync group. Returns the new generation."""
        self.generation = ray.get(self.channel.get_generation.remote())
        self.workers = self._call("ping", timeout_s=self.cfg.command_timeout_s)
        self.sync_endpoint = None
        return self.generation

    def kill_worker_for_test(self, rank: int) -> None:
        """Tests only: SIGKILL one worker process (as the kernel's OOM killer would); Ray Train sees it die."""
        import signal

        os.kill(self.workers[rank]["pid"], signal.SIGKILL)

    # -- the API ------------------------------------------------------------------------------------------------
    def train(self, batch_refs: Sequence[ray.ObjectRef], advantages: Any, version: int | None = None,
              loss: PolicyLossConfig | None = None, step: StepSettings | None = None) -> dict:
        """One update on the rollout batches (refs are fetched by the workers). Returns the global metrics.

        ``advantages``: [N] or a list of N per-token tensors, in batch order (an ObjectRef, or put here).
        ``loss`` / ``step`` override the configured settings for this call (e.g. per-phase schedules, tests)."""
        if isinstance(advantages, (torch.Tensor, list)):
            advantages = ray.put(advantages)
        handle = self.submit("train", batch_refs=list(batch_refs), advantages=advantages, version=version,
                             loss=loss, step=step)
        self._maybe_kill_for_test(version)
        return self.wait(handle)[0]

    def _maybe_kill_for_test(self, version: int | None) -> None:
        """Tests only: NGRPO_TEST_KILL_TRAINER="<version>:<rank>" kills that rank's process once, right after the
        update to that policy version was sent."""
        spec = os.environ.get("NGRPO_TEST_KILL_TRAINER")
        if spec and spec not in self._test_killed and version == int(spec.split(":")[0]):
            self._test_killed.add(spec)
            self.kill_worker_for_test(int(spec.split(":")[1]))

    def logprobs(self, batch_refs: Sequence[ray.ObjectRef], use_records: bool = True) -> list[torch.Tensor]:
        """The trainer's log-probs of every response, in batch order (each rank computes its shard)."""
        parts = self._call("logprobs", batch_refs=list(batch_refs), use_records=use_records)
        merged = dict(pair for part in parts for pair in part)
        return [merged[i] for i in range(len(merged))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._call("state_dict")[0]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._call("load_state_dict", state=ray.put(state))

    def open_weight_sync(self, num_receivers: int, timeout_s: float = 120.0) -> SyncEndpoint:
        """Pick rank 0's address and start it listening; the engines must then join with this endpoint
        (``ngrpo_init_weight_group(endpoint, rank_offset)``) before ``finish_open_weight_sync()``."""
        from ngrpo_ray.distributed.weight_sync import choose_sync_backend

        addr = self._call("sync_address", ranks=[0])[0]
        self.sync_endpoint = SyncEndpoint(addr["host"], addr["port"], 1 + num_receivers,
                                          choose_sync_backend(self.cfg.sync_backend, self.cfg.use_gpu), timeout_s)
        self._join_handle = self.submit("sync_join", ranks=[0], endpoint=asdict(self.sync_endpoint))
        return self.sync_endpoint

    def finish_open_weight_sync(self) -> None:
        self.wait(self._join_handle)

    def start_sync(self, version: int, bucket_mb: float = 64.0, send_dtype: str | None = None):
        """Begin a sync on every rank (all gather under ZeRO-3; rank 0 sends); pair with ``wait``."""
        return self.submit("sync_weights", version=version, bucket_mb=bucket_mb, send_dtype=send_dtype)

    def start_raw_broadcast(self, nbytes: int, chunk_mb: float | None = None):
        return self.submit("raw_broadcast", ranks=[0], nbytes=nbytes, chunk_mb=chunk_mb)

    def save_checkpoint(self, path: str, tag: str, hf_dir: str | None = None, hf_dtype: str = "float32") -> None:
        self._call("save_checkpoint", path=path, tag=tag, hf_dir=hf_dir, hf_dtype=hf_dtype)

    def load_checkpoint(self, path: str, tag: str) -> int:
        return int(self._call("load_checkpoint", path=path, tag=tag)[0]["policy_version"])
