"""``ngrpo bench hook-step``: the mixing hook's own time per decode step (pre-hook + post-hook) against the time of
vLLM's sampler (``vllm.v1.sample.sampler.Sampler``) on the same logits, at 8, 64 and 256 rows with V = 151,936.

No engine and no model: B requests sit in a stand-in model runner (their ids in the persistent batch, per-request
``SamplingParams`` carrying the mixing options exactly as ``generate_rollout`` sends them, vLLM's discard mask), the
logits are random fp32 [B, V], the sampler is vLLM's own with the metadata of temperature-only random sampling and
``logprobs=0`` (what RL rollouts ask for), and the real ``MixingHook`` runs on it over a stand-in embedding (a [V, d]
weight plus MixingEmbedding's ring buffers) whose full neighbor table is a random [V, k] index table: the table is
built once per weight load, so its contents do not change the per-step cost, and building the real one takes minutes
on a CPU.

Each step: the pre-hook, the sampler, the post-hook, timed separately in the same loop (so load on a shared machine
hits both), after warm-up steps (the first one indexes the batch composition). ``ratio_<B>`` = median hook time /
median sampler time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

DEFAULTS = dict(rows=(8, 64, 256), vocab=151936, dim=64, rho=0.1, k=3, temperature=1.0, steps=15, warmup=3, seed=0)


def _sampler_and_metadata(B: int, temperature: float, device: torch.device):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    md = SamplingMetadata(
        temperature=torch.full((B,), temperature, dtype=torch.float32, device=device), all_greedy=False,
        all_random=True, top_p=None, top_k=None, generators={}, max_num_logprobs=0, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.zeros(B, device=device),
        presence_penalties=torch.zeros(B, device=device), repetition_penalties=torch.ones(B, device=device),
        output_token_ids=[[] for _ in range(B)], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())
    return Sampler(logprobs_mode="raw_logprobs"), md


def _hook(sampler: Any, B: int, a: dict, device: torch.device, mixing: dict | None = None):
    """The real MixingHook over a stand-in runner of B requests; ``mixing``: their MixingParams fields (default:
    neighbor_mix with the bench's rho and k)."""
    from vllm import SamplingParams

    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.engine.embedding_patch import add_ring_buffers
    from ngrpo_ray.engine.llm_factory import make_sampling_params
    from ngrpo_ray.engine.mixing_hook import MixingHook
    from ngrpo_ray.engine.rollout import stream_params

    g = torch.Generator().manual_seed(a["seed"])
    V = a["vocab"]
    params = MixingParams(**(mixing or {"strategy": "neighbor_mix", "rho": a["rho"], "k": a["k"], "seed": a["seed"]}))
    k = max(a["k"], params.record_width(V))  # the ring's record width, as the engine sizes it
    emb = torch.nn.Module()
    emb.weight = torch.nn.Parameter(torch.randn(V, a["dim"], generator=g), requires_grad=False)
    emb.embedding_dim = a["dim"]
    add_ring_buffers(emb, 1 << 16, k, params.strategy == "gaussian_noise", a["dim"], torch.float32, device)
    sp = make_sampling_params({"temperature": a["temperature"], "max_tokens": 1 << 20}, params, [])
    per_request = stream_params(sp, B, 1, {"purpose": "bench"})
    assert isinstance(per_request[0], SamplingParams)
    req_ids = [f"r{i}" for i in range(B)]
    discard = SimpleNamespace(np=np.zeros(B, dtype=bool), gpu=torch.zeros(B, dtype=torch.bool, device=device))
    runner = SimpleNamespace(sampler=sampler, input_batch=SimpleNamespace(req_ids=req_ids), max_num_reqs=B,
                             requests={r: SimpleNamespace(sampling_params=p) for r, p in zip(req_ids, per_request)},
                             discard_request_mask=discard)
    hook = MixingHook(runner, emb, V, seed=a["seed"], neighbor_mode="full")
    hook.remove()  # called directly below, so each part is timed on its own
    # the full table built at weight load (a random stand-in: the per-step cost is a gather either way)
    table = torch.randint(0, V, (V, k), generator=g)
    table[:, 0] = torch.arange(V)  # row v starts with v, like every real table
    hook.tables._tables["cosine"] = table.to(device)
    return hook


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_rows(B: int, a: dict, device: torch.device, log=None) -> dict:
    sampler, md = _sampler_and_metadata(B, a["temperature"], device)
    hook = _hook(sampler, B, a, device)
    g = torch.Generator().manual_seed(a["seed"] + B)
    base = (torch.randn(B, a["vocab"], generator=g) * 3.0).to(device)
    logits = torch.empty_like(base)
    pre, post, samp, mixed = [], [], [], 0
    for step in range(a["warmup"] + a["steps"]):
        logits.copy_(base)  # the sampler may scale logits in place
        counter_before = int(hook.counter)
        t0 = time.perf_counter()
        hook._pre_hook(sampler, (), {"logits": logits, "sampling_metadata": md})
        t1 = time.perf_counter()
        out = sampler(logits=logits, sampling_metadata=md)
        t2 = time.perf_counter()
        hook._post_hook(sampler, (), {"logits": logits, "sampling_metadata": md}, out)
        t3 = time.perf_counter()
        if step >= a["warmup"]:
            pre.append(t1 - t0)
            samp.append(t2 - t1)
            post.append(t3 - t2)
            mixed += int(hook.counter) - counter_before
        if log is not None:
            log(f"hook-step B={B}: step {step + 1}/{a['warmup'] + a['steps']}")
    hook_times = [p + q for p, q in zip(pre, post)]
    return {
        "rows": B, "steps": a["steps"],
        "sampler_ms": 1e3 * _median(samp), "hook_ms": 1e3 * _median(hook_times),
        "pre_hook_ms": 1e3 * _median(pre), "post_hook_ms": 1e3 * _median(post),
        "ratio": _median(hook_times) / _median(samp),
        "mixed_fraction": mixed / (B * a["steps"]),
        "steps_reusing_vllm_logprob": hook.steps_reusing_vllm_logprob,
    }


def run_hook_step_bench(args: Any = None, log=None) -> dict:
    a = dict(DEFAULTS)
    if args is not None:
        given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        a.update({k: v for k, v in given.items() if k in DEFAULTS and v is not None})
    if log is None:
        log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = [run_rows(int(B), a, device, log) for B in a["rows"]]
    out: dict[str, Any] = {
        "device": str(device), "torch_threads": torch.get_num_threads(), "vocab": a["vocab"], "rho": a["rho"],
        "k": a["k"], "temperature": a["temperature"], "per_rows": results,
    }
    for r in results:
        out[f"ratio_{r['rows']}"] = r["ratio"]
    return out


def add_hook_step_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULTS["rows"]))
    for name in ("rho", "temperature"):
        parser.add_argument(f"--{name}", type=float, default=DEFAULTS[name])
    for name in ("vocab", "dim", "k", "steps", "warmup", "seed"):
        parser.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
