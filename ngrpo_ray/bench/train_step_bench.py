"""``ngrpo bench train-step``: the trainer's update of one demo iteration's rollouts against a plain transformers
forward + backward + AdamW of the same tokens, in one process, on the same batch.

The batch has a demo iteration's shape (``cpu_default``: 8 prompts x 8 responses, ~100-token prompts, up to 64-token
responses) and is synthetic: random prompt / response ids, about 10% mixed steps with k = 3 candidates (the trainer
rebuilds those mixtures; the plain side just feeds the token ids). Both sides start from the same weights and use
the preset's optimizer settings, threads, mini-batches and micro-batches:
- trainer: ``_PolicyWorker.train`` (DeepSpeed engine, ``train_on_sequences``) built from the preset exactly as the
  driver builds it, in this process (a one-rank gloo group; no Ray, whose transport is not the subject here);
- plain: ``model(input_ids, attention_mask, labels).loss.backward()`` per micro-batch of the same sequences (right
  padded, the same split), ``torch.optim.AdamW.step()`` per mini-batch.
Rounds alternate which side goes first so machine noise hits both alike, after one small warm-up call of each.
``ratio`` = trainer seconds / plain seconds (summed over rounds).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

DEFAULTS = dict(preset="cpu_default", rounds=2, seed=0, prompt_tokens=100, response_tokens=64, overrides=())


def synthetic_rollouts(n_prompts: int, group: int, prompt_tokens: int, response_tokens: int, vocab: int,
                       seed: int, mixed_fraction: float = 0.1, k: int = 3) -> dict:
    """{"prompts", "records"} with a demo iteration's shape; responses of one group share their prompt."""
    from ngrpo_ray.core.records import ResponseRecord

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompts, records = [], []
    for _ in range(n_prompts):
        prompt = torch.randint(2, vocab, (rng.randint(prompt_tokens - 10, prompt_tokens + 10),), generator=g)
        for _ in range(group):
            T = rng.randint(response_tokens * 3 // 4, response_tokens)
            mixed = torch.rand(T, generator=g) < mixed_fraction
            prompts.append(prompt)
            records.append(ResponseRecord(
                response_ids=torch.randint(2, vocab, (T,), generator=g),
                logprobs=-torch.rand(T, generator=g) * 3.0, mixed_mask=mixed,
                cand_ids=torch.randint(2, vocab, (T, k), generator=g),
                alpha=torch.softmax(torch.randn(T, k, generator=g), -1)))
    return {"prompts": prompts, "records": records}


def _one_rank_group() -> None:
    from ngrpo_ray.distributed.weight_sync import free_port

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", str(free_port("127.0.0.1")))


def _plain_update(model, optimizer, batch: dict, order: list[list[list[int]]], pad_id: int) -> None:
    """Forward + backward + AdamW over the same sequences, mini-batches and micro-batches as the trainer."""
    model.train()
    for mini in order:
        for micro in mini:
            seqs = [torch.cat([batch["prompts"][i], batch["records"][i].response_ids]) for i in micro]
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            attn = torch.zeros(len(seqs), L, dtype=torch.long)
            labels = torch.full((len(seqs), L), -100, dtype=torch.long)
            for r, (i, s) in enumerate(zip(micro, seqs)):
                ids[r, : len(s)], attn[r, : len(s)] = s, 1
                P = len(batch["prompts"][i])
                labels[r, P: len(s)] = s[P:]  # loss on the response tokens, as the trainer
            model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _micro_order(n: int, mini_batches: int, micro_batches: int, seed: int) -> list[list[list[int]]]:
    from ngrpo_ray.training.micro_batches import split_even
    from ngrpo_ray.training.train_step import mini_batch_plan

    return [split_even(mb, micro_batches) for mb in mini_batch_plan(range(n), mini_batches, 0, seed, True)]


def run_train_step_bench(args: Any) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from ngrpo_ray.config.load import load_config
    from ngrpo_ray.distributed.components import trainer_config
    from ngrpo_ray.distributed.policy_worker import _PolicyWorker
    from ngrpo_ray.models.offline import resolve_model

    a = dict(DEFAULTS)
    a.update({k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else dict(args)).items()
              if v is not None})
    cfg = load_config(a["preset"], list(a["overrides"]))
    path = resolve_model(cfg.model.path)
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    batch = synthetic_rollouts(cfg.trainer.prompts_per_iteration, cfg.rollout.group_size, a["prompt_tokens"],
                               min(a["response_tokens"], cfg.rollout.max_new_tokens), vocab, a["seed"])
    n = len(batch["records"])
    warm = {"prompts": batch["prompts"][:2], "records": batch["records"][:2]}
    tokens = sum(len(p) + len(r) for p, r in zip(batch["prompts"], batch["records"]))
    response_tokens = sum(len(r) for r in batch["records"])

    tcfg = trainer_config(cfg, path, pad_id=0)
    if cfg.trainer.num_workers != 1:
        raise ValueError("bench train-step runs one trainer rank in this process: use trainer.num_workers=1")
    _one_rank_group()
    worker = _PolicyWorker(tcfg)
    torch.set_num_threads(max(1, tcfg.torch_threads))
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=worker.engine.module.dtype)
    plain.load_state_dict(worker.state_dict(), strict=False)
    ds = tcfg.deepspeed
    opt = torch.optim.AdamW(plain.parameters(), lr=ds.lr, betas=ds.betas, eps=ds.eps, weight_decay=ds.weight_decay)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(a["seed"]))
    step = tcfg.step
    order = _micro_order(n, step.mini_batches, step.micro_batches, step.seed)

    def trainer_round(b: dict, advantages: torch.Tensor) -> float:
        t0 = time.perf_counter()
        worker.train([b], advantages)
        return time.perf_counter() - t0

    def plain_round(b: dict, o: list) -> float:
        t0 = time.perf_counter()
        _plain_update(plain, opt, b, o, 0)
        return time.perf_counter() - t0

    trainer_round(warm, adv[:2]), plain_round(warm, [[[0, 1]]])  # first-call costs stay out of the timing
    rounds, t_s, p_s = [], 0.0, 0.0
    for r in range(a["rounds"]):
        if r % 2 == 0:
            ts, ps = trainer_round(batch, adv), plain_round(batch, order)
        else:
            ps, ts = plain_round(batch, order), trainer_round(batch, adv)
        t_s, p_s = t_s + ts, p_s + ps
        rounds.append({"round": r, "trainer_s": ts, "plain_s": ps, "ratio": ts / ps})
    return {
        "preset": a["preset"], "model": cfg.model.path, "sequences": n, "tokens": tokens,
        "response_tokens": response_tokens, "mini_batches": step.mini_batches, "micro_batches": step.micro_batches,
        "max_tokens_per_micro_batch": step.max_tokens_per_micro_batch, "zero_stage": ds.zero_stage,
        "dtype": ds.dtype, "torch_threads": tcfg.torch_threads, "rounds": a["rounds"],
        "trainer_s": t_s / a["rounds"], "plain_s": p_s / a["rounds"],
        "trainer_tokens_per_s": tokens * a["rounds"] / t_s, "plain_tokens_per_s": tokens * a["rounds"] / p_s,
        "ratio": t_s / p_s, "per_round": rounds,
    }


def add_train_step_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=DEFAULTS["preset"], help="preset whose trainer settings and shapes to use")
    for name in ("rounds", "seed", "prompt_tokens", "response_tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=DEFAULTS[name])
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the preset")
