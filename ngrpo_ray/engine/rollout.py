"""One generate call on a hooked LLM -> RolloutBatch (driver side of the engine adapter)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from ngrpo_ray.core.rollout_batch import RolloutBatch
from ngrpo_ray.engine.llm_factory import make_sampling_params
from ngrpo_ray.engine.records_client import EngineHookError, fetch_records, logprobs_of
from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY, to_wire, with_stream


def stop_ids_of(model_path: str) -> list[int]:
    """EOS ids of a checkpoint (config + generation_config): the hooked engine has no tokenizer, so it is told."""
    from transformers import AutoConfig, GenerationConfig

    ids: set[int] = set()
    for eos in (getattr(AutoConfig.from_pretrained(model_path), "eos_token_id", None),):
        ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    except OSError:  # no generation_config.json
        pass
    return sorted(int(i) for i in ids)


def _as_dict(x: Any) -> dict:
    import dataclasses

    if x is None:
        return {}
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else dict(x)


def stream_params(sp: Any, num_prompts: int, group_size: int, stream: dict | None) -> list[Any]:
    """One SamplingParams per response, each naming its gate stream (core.gate_stream): purpose, call (the policy
    version unless ``stream`` says otherwise) and global index = (first_prompt + prompt index) * group_size + sample."""
    stream = dict(stream or {})
    purpose = gate_purpose(stream.get("purpose", "train"))
    call, first = int(stream.get("call", 0)), int(stream.get("first_prompt", 0))
    wire = sp.extra_args[EXTRA_ARGS_KEY]
    out = []
    for g in range(num_prompts):
        for s in range(group_size):
            one = copy.copy(sp)
            one.extra_args = {**sp.extra_args,
                              EXTRA_ARGS_KEY: with_stream(wire, purpose, call, (first + g) * group_size + s)}
            out.append(one)
    return out


def gate_purpose(purpose: str | int) -> int:
    from ngrpo_ray.core.gate_stream import PURPOSES

    if isinstance(purpose, int):
        return purpose
    if purpose not in PURPOSES:
        raise ValueError(f"stream purpose must be one of {sorted(PURPOSES)}, got {purpose!r}")
    return PURPOSES[purpose]


def generate_rollout(llm: Any, prompt_token_ids: list[list[int]], sampling: Any, mixing: Any,
                     policy_version: int = 0, group_size: int = 1, stop_token_ids: list[int] = (),
                     tokenizer: Any = None, stream: dict | None = None) -> RolloutBatch:
    """Each prompt is sampled ``group_size`` times (one request each); records are resolved in one RPC.

    ``stream`` names the responses' gate streams: {"purpose": "train" | "validate" | "evaluate" | "bench",
    "call": int (default: policy_version), "first_prompt": global index of the first prompt (default 0)}."""
    sampling = _as_dict(sampling)
    k = int(to_wire(mixing)["width"])  # record width: k, or top_k for the soft-token strategies
    sp = make_sampling_params(sampling, mixing, list(stop_token_ids))
    stream = {"call": int(policy_version), **(stream or {})}
    per_request = stream_params(sp, len(prompt_token_ids), group_size, stream)
    requests, groups, samples = [], [], []
    for g, ids in enumerate(prompt_token_ids):
        for s in range(group_size):
            requests.append({"prompt_token_ids": [int(t) for t in ids]})
            groups.append(g)
            samples.append(s)
    t0 = time.perf_counter()
    outputs = llm.generate(requests, per_request, use_tqdm=False)
    seconds = time.perf_counter() - t0
    completions = [o.outputs[0] for o in outputs]
    for c in completions:
        if c.finish_reason not in ("stop", "length"):
            raise EngineHookError(f"request finished with {c.finish_reason!r}")
    token_ids = [list(c.token_ids) for c in completions]
    recs = fetch_records(llm, token_ids, [logprobs_of(c) for c in completions], k)
    resp = [torch.from_numpy(r.response_ids) for r in recs]
    text = [tokenizer.decode(r.tolist(), skip_special_tokens=True) if tokenizer is not None else "" for r in resp]
    n_tokens = sum(len(t) for t in token_ids)
    B = len(requests)
    noise = None
    if any(r.noise_seed is not None for r in recs):  # the gaussian_noise baseline: seeds rebuild the noise
        noise = [torch.from_numpy(r.noise_seed) if r.noise_seed is not None else torch.full((len(r.response_ids),), -1)
                 for r in recs]
    return RolloutBatch(
        prompt_ids=[torch.tensor(r["prompt_token_ids"], dtype=torch.long) for r in requests],
        response_ids=resp, response_text=text,
        logprobs=[torch.from_numpy(r.logprobs) for r in recs],
        mixed_mask=[torch.from_numpy(r.mixed_mask) for r in recs],
        cand_ids=[torch.from_numpy(r.cand_ids) for r in recs],
        alpha=[torch.from_numpy(r.alpha) for r in recs],
        finish_reason=[c.finish_reason for c in completions],
        group_index=torch.tensor(groups, dtype=torch.long), sample_index=torch.tensor(samples, dtype=torch.long),
        policy_version=torch.full((B,), int(policy_version), dtype=torch.long),
        timings={"generation_s": seconds, "tokens": float(n_tokens), "tokens_per_s": n_tokens / max(seconds, 1e-9)},
        noise_seed=noise,
    )
