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

import itertools
import tempfile
import threading
import time
import uuid
from typing import Any, Sequence

import ray
import torch

from ngrpo_ray.core.losses import PolicyLossConfig
from ngrpo_ray.distributed.command_channel import _CommandChannel
from ngrpo_ray.distributed.policy_worker import _worker_loop
from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig, TrainerGroupError, TrainerRestarted
from ngrpo_ray.distributed.weight_sync import choose_sync_backend
from ngrpo_ray.training.peak_memory import max_over_ranks
from ngrpo_ray.training.train_step import StepSettings


class TrainerGroup:
    """Driver-side handle. ``start()`` once, then ``train(refs, advantages)`` per iteration, ``shutdown()`` at the end."""

    def __init__(self, cfg: TrainerGroupConfig):
        self.cfg = cfg
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._fit_error: BaseException | None = None
        self.channel = None
        self.sync_backend: str | None = None  # the weight transfer's, once open_weight_sync ran
        self.sync_transport, self.sync_transport_note = None, ""  # ngrpo_gloo: shared_memory or gloo, and why
        self.startup_seconds = 0.0
        self.generation = 0  # the worker group's restarts the driver has seen and recovered from

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
        self.sync_backend, self.sync_transport, self.sync_transport_note = None, None, ""
        return self.generation

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
        return max_over_ranks(self.wait(handle))  # the loss metrics are global already; memory is per rank

    def logprobs(self, batch_refs: Sequence[ray.ObjectRef], use_records: bool = True) -> list[torch.Tensor]:
        """The trainer's log-probs of every response, in batch order (each rank computes its shard)."""
        parts = self._call("logprobs", batch_refs=list(batch_refs), use_records=use_records)
        merged = dict(pair for part in parts for pair in part)
        return [merged[i] for i in range(len(merged))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._call("state_dict")[0]

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._call("load_state_dict", state=ray.put(state))

    def open_weight_sync(self, engines: Sequence[Any], timeout_s: float = 120.0, bucket_mb: float = 64.0,
                         same_gpu: bool = False, engine_tp: int = 1, shared_memory: bool = True) -> str:
        """(Re)build the weight transfer from rank 0 to ``engines`` (RolloutEngine actors, each split over
        ``engine_tp`` tensor-parallel workers, every one a member) through vLLM's weight-transfer API; returns the
        backend (weight_sync.choose_sync_backend). ``shared_memory`` (ngrpo_gloo): False sends the bytes over gloo
        even to engines on rank 0's host, as between nodes (the sync benchmark's ``--transport gloo``)."""
        backend = choose_sync_backend(self.cfg.sync_backend, self.cfg.use_gpu, same_gpu)
        rank0 = self.wait(self.submit("open_weight_transfer", engines=list(engines), backend=backend,
                                      timeout_s=timeout_s, bucket_mb=bucket_mb, engine_tp=engine_tp,
                                      shared_memory=shared_memory), timeout_s=timeout_s + 60)[0]
        self.sync_transport, self.sync_transport_note = rank0["transport"], rank0["transport_note"]
        self.sync_backend = backend
        return backend

    def close_weight_sync(self, timeout_s: float = 120.0) -> None:
        """Every rank closes its side of the weight transfer, so no engine waits in it for a sender that stopped (a
        sync that failed on another engine); the next open rebuilds it."""
        self.wait(self.submit("close_weight_transfer"), timeout_s=timeout_s)
        self.sync_backend = None

    def start_sync(self, version: int):
        """Begin a sync on every rank (all gather under ZeRO-3; rank 0 sends and drives the engines); pair with
        ``wait``: rank 0's reply holds the engines' stats under "engines"."""
        return self.submit("sync_weights", version=version)

    def start_raw_broadcast(self, nbytes: int, chunk_mb: float | None = None):
        return self.submit("raw_broadcast", ranks=[0], nbytes=nbytes, chunk_mb=chunk_mb)

    def save_checkpoint(self, path: str, tag: str, hf_dir: str | None = None, hf_dtype: str = "float32") -> None:
        self._call("save_checkpoint", path=path, tag=tag, hf_dir=hf_dir, hf_dtype=hf_dtype)

    def load_checkpoint(self, path: str, tag: str) -> int:
        return int(self._call("load_checkpoint", path=path, tag=tag)[0]["policy_version"])
