"""One trainer rank inside the Ray Train worker group: its state (``_PolicyWorker``: the DeepSpeed engine, the
reference model, the weight-sync group on rank 0) and the command loop Ray Train runs (``_worker_loop``)."""

from __future__ import annotations

import gc
import math
import os
import time
import traceback
from typing import Any, Sequence

import ray
import torch

from ngrpo_ray.core.losses import PolicyLossConfig
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig, TrainerGroupError
from ngrpo_ray.training.peak_memory import PhasePeak
from ngrpo_ray.training.train_sequence import TrainSequence
from ngrpo_ray.training.train_step import StepSettings


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


class _PolicyWorker:
    """State of one rank: the DeepSpeed engine, the optional reference model, the weight-sync group (rank 0)."""

    def __init__(self, cfg: TrainerGroupConfig):
        import deepspeed
        from transformers import AutoModelForCausalLM

        from ngrpo_ray.training.deepspeed_config import (
            build_config, build_optimizer, build_scheduler, init_distributed)
        from ngrpo_ray.training.reference_model import load_reference_model

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
        # partitioned like the policy under ZeRO-3, a plain copy otherwise
        self.ref = load_reference_model(cfg.model_path, dtype, self.device, cfg.deepspeed, self.world) if want_ref \
            else None
        self.weight_group = None  # rank 0 sends: vLLM's TrainerWeightTransferEngine (open_weight_transfer)
        self.weight_client = None
        self.deferred = None  # ipc: the client that keeps an engine's error until every rank's collectives ran
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
        from ngrpo_ray.training.deepspeed_config import loss_scale_for_deepspeed
        from ngrpo_ray.training.train_step import train_on_sequences

        start = time.monotonic()
        step = step or self.cfg.step
        if step.micro_batches != self.engine.gradient_accumulation_steps():
            # DeepSpeed's accumulation boundary must match the micro-batches we run per optimizer step
            self.engine.set_train_batch_size(step.micro_batches * self.world)
        local, all_idx = self._local(batch_refs, advantages)
        ref = self.ref
        with PhasePeak(self.device, "update") as peak:
            metrics = train_on_sequences(self.engine, local, all_idx, step, loss or self.cfg.loss,
                                         ref.module if ref is not None else None,
                                         loss_scale=loss_scale_for_deepspeed(self.world, step.micro_batches),
                                         grad_norm_fn=self.engine.get_global_grad_norm,
                                         ref_start_pass=ref.start_pass if ref is not None else None)
        metrics.update(peak.metrics())
        metrics["lr"] = float(self.engine.get_lr()[0]) if self.engine.get_lr() else self.cfg.deepspeed.lr
        metrics["train_seconds"] = time.monotonic() - start
        self.version = version if version is not None else self.version + 1
        metrics["policy_version"] = float(self.version)
        self._hand_back_gpu_cache()
        return metrics

    def logprobs(self, batch_refs: list, use_records: bool = True) -> list[tuple[int, torch.Tensor]]:
        from ngrpo_ray.training.logprobs import _agreed_count, response_logprobs
        from ngrpo_ray.training.zero3_passes import head_calls, start_pass

        local, all_idx = self._local(batch_refs, None)
        if len(all_idx) < self.world:  # decided on the global count: every rank raises, none waits in a collective
            raise TrainerGroupError(f"logprobs of {len(all_idx)} sequences on {self.world} trainer ranks: every rank "
                                    f"needs at least one")
        model = self.engine.module
        model.eval()
        out = []
        # ZeRO-3: every rank makes as many forward passes as the busiest (repeats of its first sequence, dropped)
        passes = list(local) + [local[0]] * (_agreed_count(len(local), model) - len(local))
        chunk = self.cfg.step.logprob_chunk_tokens
        calls = head_calls([len(s.record) for s in passes], chunk, model)
        with torch.no_grad():
            for s in passes:
                start_pass(self.engine)
                tb = response_logprobs(model, [s.prompt_ids], [s.record], self.cfg.step.temperature,
                                       self.cfg.step.pad_id, use_records=use_records, noise_std=self.cfg.step.noise_std,
                                       chunk_tokens=chunk, head_calls=calls)
                out.append((s.index, tb.logp[0, : len(s.record)].float().cpu()))
        out = out[: len(local)]
        model.train()
        return out

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor] | None:
        """Full (gathered under ZeRO-3) parameters in `dtype` on rank 0; None elsewhere. Every rank must run it."""
        from ngrpo_ray.distributed.weight_sync import gathered

        out: dict[str, torch.Tensor] = {}
        # one parameter at a time (in the same order on every rank: each gather is a collective), so a rank never
        # holds more than one full parameter beyond its shard; a whole-model gather would put a full copy of the
        # model on every GPU next to a colocated engine that is awake
        for n, p in self.engine.module.named_parameters():
            with gathered([p], self.cfg.deepspeed.zero_stage == 3):
                if self.rank == 0:
                    out[n] = p.detach().to(dtype).cpu().clone()
        return out if self.rank == 0 else None

    def load_state_dict(self, state: Any) -> None:
        """Overwrite the parameters (e.g. reset in tests). Stage 0-2 only: ZeRO-1/2 keep fp32 master copies."""
        state = _resolve(state)
        if self.cfg.deepspeed.zero_stage == 3:  # each rank holds a partition: copy_ into it would not be the weights
            raise TrainerGroupError("load_state_dict under ZeRO-3 is not supported: use load_checkpoint")
        if self.cfg.deepspeed.zero_stage != 0 or self.cfg.deepspeed.dtype != "fp32":
            opt = self.engine.optimizer
            if not hasattr(opt, "refresh_fp32_params") and self.cfg.deepspeed.zero_stage > 0:
                raise TrainerGroupError("load_state_dict under ZeRO needs the DeepSpeed checkpoint API")
        with torch.no_grad():
            for n, p in self.engine.module.named_parameters():
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))
        if self.cfg.deepspeed.zero_stage in (1, 2):
            self.engine.optimizer.refresh_fp32_params()  # copy model params into the fp32 master partitions

    def open_weight_transfer(self, engines: list, backend: str, timeout_s: float, bucket_mb: float,
                             engine_tp: int = 1, shared_memory: bool = True) -> dict:
        """Every rank: build the trainer side of vLLM's weight-transfer API for ``backend``; on rank 0 that also makes
        every engine join (its ``engine_tp`` workers take the ranks after the previous engine's). Replaces a previous
        transfer (engine or trainer restarts rebuild it with every engine)."""
        from ngrpo_ray.distributed.weight_client import DeferredFailures, FleetWeightClient
        from ngrpo_ray.distributed.weight_sync import node_ip
        from ngrpo_ray.engine.trainer_weights import TrainerWeightSource, open_trainer_engine

        self.close_weight_transfer()
        source = TrainerWeightSource(self.engine.module, zero3=self.cfg.deepspeed.zero_stage == 3)
        self.weight_client = FleetWeightClient(engines, timeout_s, tp=engine_tp)
        # ipc: every rank runs collectives between the sender's calls to the engines; a failed call must not stop them
        self.deferred = DeferredFailures(self.weight_client) if backend == "ipc" else None
        self.weight_group = open_trainer_engine(backend, rank=self.rank, host=node_ip(),
                                                world_size=1 + len(engines) * engine_tp,
                                                timeout_s=timeout_s, bucket_bytes=int(bucket_mb * 2**20),
                                                client=self.deferred or self.weight_client, source=source,
                                                shared_memory=shared_memory)
        # ngrpo_gloo: how its bytes travel (shared memory or gloo) and, for gloo, why; meaningful on rank 0
        return {"ok": True, "backend": backend, "transport": getattr(self.weight_group, "transport", backend),
                "transport_note": getattr(self.weight_group, "transport_note", "")}

    def _hand_back_gpu_cache(self) -> None:
        """Colocated on GPU: return the blocks torch's caching allocator keeps after the update (activations, logit
        chunks) and after the sync (gathers, packed buckets) to the driver, so the engine waking on this GPU finds
        them free; the memory plan (planning/memory.py) counts on it. Costs fresh cudaMallocs in the next step."""
        if self.cfg.empty_cuda_cache and torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()

    def close_weight_transfer(self) -> None:
        if self.weight_group is not None:
            self.weight_group.shutdown()
            self.weight_group = None

    def sync_weights(self, version: int) -> dict:
        """Every rank (ZeRO-3 gathers are collectives); rank 0 sends and drives the engines' update as ``version``."""
        if self.weight_group is None:
            raise TrainerGroupError("sync_weights before open_weight_transfer")
        start = time.monotonic()
        self.weight_client.version = int(version)
        source = self.weight_group.source
        source.begin()
        with PhasePeak(self.device, "sync") as peak:
            try:
                self.weight_group.send_weights()
            except Exception:
                source.finish()  # the gathers the sender skipped: the other ranks are waiting in them (ZeRO-3)
                raise
            if self.deferred is not None:
                self.deferred.raise_failure()  # ipc: an engine's error, kept until every rank's collectives ran
        self.version = version
        self._hand_back_gpu_cache()
        stats = {"bytes": sum(math.prod(m.shape) * m.dtype.itemsize for m in self.weight_group.source.metadata()),
                 **(getattr(self.weight_group, "last_stats", None) or {}), **peak.metrics()}
        return {**stats, "version": int(version), "seconds": time.monotonic() - start,
                "engines": list(self.weight_client.engine_stats) if self.rank == 0 else []}

    def raw_broadcast(self, nbytes: int, chunk_mb: float | None) -> dict:
        from ngrpo_ray.distributed.weight_sync import raw_broadcast_seconds

        if self.rank != 0:
            return {}
        return {"seconds": raw_broadcast_seconds(self.weight_group.group, nbytes, chunk_mb)}

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
