"""Driver side of the records: check RPC results, fetch the mixtures of virtual ids, build per-response arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE


class EngineHookError(RuntimeError):
    """An ngrpo_* RPC failed inside the engine worker."""


def check(results: list[dict]) -> dict:
    """collective_rpc returns one result per worker; raise the first error, else return rank 0's result."""
    for r in results:
        if not isinstance(r, dict) or not r.get("ok", False):
            msg = r.get("error", repr(r)) if isinstance(r, dict) else repr(r)
            raise EngineHookError(f"ngrpo worker RPC failed: {msg}")
    return results[0]


@dataclass
class ResponseRecord:
    """One response in the records contract (length T)."""

    response_ids: np.ndarray  # [T] int64, the text token (anchor, or the sampled token under emit "sampled")
    mixed_mask: np.ndarray  # [T] bool
    cand_ids: np.ndarray  # [T, k] int64
    alpha: np.ndarray  # [T, k] float32
    logprobs: np.ndarray  # [T] float32
    noise_seed: np.ndarray | None = None  # [T] int64, -1 where no noise; None: no step of the response had noise


def fetch_records(llm: Any, outputs_token_ids: list[list[int]], outputs_logprobs: list[list[float]], k: int
                  ) -> list[ResponseRecord]:
    """Resolve every virtual id of every response through one RPC (k: the record width, k or top_k)."""
    vids = sorted({t for ids in outputs_token_ids for t in ids if t >= VIRTUAL_BASE})
    table = check(llm.collective_rpc("ngrpo_records", args=(vids,))) if vids else {
        "cand": [], "alpha": [], "token": [], "logprob": [], "noise_seed": []}
    index = {v: i for i, v in enumerate(vids)}
    width = len(table["cand"][0]) if vids else k
    cand_all = np.asarray(table["cand"], dtype=np.int64).reshape(len(vids), width)
    alpha_all = np.asarray(table["alpha"], dtype=np.float32).reshape(len(vids), width)
    lp_all = np.asarray(table["logprob"], dtype=np.float32)
    token_all = np.asarray(table["token"], dtype=np.int64) if "token" in table else cand_all[:, 0]
    seed_all = np.asarray(table.get("noise_seed") or [-1] * len(vids), dtype=np.int64)
    if vids and cand_all.shape[1] < k:
        raise EngineHookError(f"engine k_max={cand_all.shape[1]} < requested k={k}")
    out = []
    for ids, lps in zip(outputs_token_ids, outputs_logprobs):
        ids_arr = np.asarray(ids, dtype=np.int64)
        T = ids_arr.shape[0]
        mixed = ids_arr >= VIRTUAL_BASE
        cand = np.zeros((T, k), dtype=np.int64)
        alpha = np.zeros((T, k), dtype=np.float32)
        logprobs = np.asarray(lps, dtype=np.float32).reshape(T)
        resp = ids_arr.copy()
        cand[:, 0] = ids_arr
        alpha[:, 0] = 1.0
        seeds = np.full(T, -1, dtype=np.int64)
        for t in np.nonzero(mixed)[0]:
            i = index[int(ids_arr[t])]
            cand[t] = cand_all[i, :k]
            alpha[t] = alpha_all[i, :k]
            resp[t] = token_all[i]
            logprobs[t] = lp_all[i]
            seeds[t] = seed_all[i]
        cand[~mixed, 0] = resp[~mixed]
        out.append(ResponseRecord(resp, mixed, cand, alpha, logprobs, seeds if (seeds >= 0).any() else None))
    return out


def logprobs_of(completion: Any) -> list[float]:
    """The emitted token's logprob at every step (the hook wrote it first in each position's dict)."""
    if completion.logprobs is None:
        raise EngineHookError("the engine returned no logprobs (SamplingParams.logprobs must be 0)")
    out = []
    for tok, pos in zip(completion.token_ids, completion.logprobs):
        lp = pos.get(tok) if hasattr(pos, "get") else None
        if lp is None:
            raise EngineHookError(f"no logprob for emitted token {tok}")
        out.append(float(lp.logprob))
    return out
