"""``ngrpo bench hook-overhead``: tokens/s of a vanilla vLLM engine vs the neighbor-mixing engine, one process.
Also ``ngrpo bench neighbor-table`` (the full table build's seconds). Both print progress with an estimate on stderr.

Both engines are alive together and each round runs vanilla, hooked, hooked, vanilla (odd rounds the mirror), so a
drift in the machine's speed over a round costs both engines alike (jitter between single runs it cannot cancel; each
run's tokens/s is kept per round); ``slowdown`` is from the summed tokens and seconds, ``slowdown_median_of_rounds``
is the median of the per-round slowdowns. Same prompts, same sampling settings (temperature, max_tokens with ignore_eos
so every sequence has the same length, detokenize off, logprobs=0 since RL needs them either way), and no tokenizer in
either engine. The hooked time includes resolving the records and building the RolloutBatch. slowdown = 1 - hooked /
vanilla; ``slowdown_generate`` is the same for the hooked engine's ``generate`` call alone, so the two parts of the
hooked time can be told apart; ``hook_host_share`` is the hooks' own time, measured inside the engine, over the hooked
generate time (no noise between two engines' runs in it, and no in-graph embedding either).
The hooked engine's neighbor tables follow the engine default (lazy on CPU: rows computed for each new anchor, and
sampling makes new anchors in every round, so one pass over E per step with a new anchor stays in the timed rounds);
``--neighbor-mode full`` builds the whole table in the warm-up instead (the GPU default, so the timed rounds see the
hook as a GPU engine runs it; the SmolLM2 table builds in about 93 s on this 2-core CPU). ``neighbor_build_seconds``
reports the full build's time.
``--warmup-tokens`` shortens the warm-up round (default: max_tokens); it only needs to compile and build the table.
Callers that build engines need an ``if __name__ == "__main__":`` guard (vLLM spawns processes). ``--model`` takes
the demo name (default, offline), a local folder or an HF id, resolved by ``models.offline.resolve_model`` like every
other entry point.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Iterator, TextIO


def json_only_stdout() -> None:
    """Send vLLM's log lines to stderr (its default is stdout), so a benchmark's stdout is exactly its JSON
    (``ngrpo bench ... > result.json``). Call before vLLM is imported; Ray workers started afterwards inherit it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """``sys.stdout`` is stderr inside the block, which yields the real stdout: lines Ray forwards from its workers
    (DeepSpeed's warnings in a trainer worker, say) and any library's prints land on stderr, so the JSON a benchmark
    prints to the yielded stream afterwards is the whole of its stdout."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real


def print_bench_json(run: Callable[[], dict]) -> None:
    """Run a benchmark with stdout on stderr, then print its JSON as the whole of stdout."""
    with stdout_to_stderr() as stdout:
        result = run()
    print(json.dumps(result, indent=2), file=stdout)


DEFAULTS = dict(model="smollm2-135m-instruct", rho=0.1, k=3, num_seqs=32, max_tokens=256, prompt_len=32, rounds=5, temperature=1.0,
                seed=0, kv_cache_gib=2.0, max_model_len=1024, enforce_eager=False, dtype="float32",
                neighbor_mode=None, warmup_tokens=None)


def _args_dict(args: Any) -> dict:
    d = dict(DEFAULTS)
    d.update({k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else dict(args)).items()
              if v is not None})
    if not d["model"]:
        raise ValueError("bench hook-overhead needs --model (the demo model name, a local folder or an HF id)")
    return d


def _prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    hi = max(min(vocab, 20000), 3)
    return [[rng.randrange(2, hi) for _ in range(length)] for _ in range(n)]


def run_hook_overhead_bench(args: Any, engines: tuple[Any, Any] | None = None) -> dict:
    """Returns (and the CLI prints as JSON) tokens/s of both engines and the slowdown.

    ``engines`` = (vanilla LLM, hooked LLM) reuses engines already built (tests); otherwise both are built here
    from the same EngineSpec, the vanilla one without any hook setting."""
    from transformers import AutoConfig
    from vllm import SamplingParams

    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm
    from ngrpo_ray.engine.rollout import generate_rollout
    from ngrpo_ray.models.offline import resolve_model
    from ngrpo_ray.progress import Progress

    a = _args_dict(args)
    if a["rounds"] < 1:
        raise ValueError(f"rounds must be at least 1, got {a['rounds']}")
    progress = Progress(a["rounds"], "bench hook-overhead rounds", quiet_s=0.0, every_s=0.0)
    path = resolve_model(str(a["model"]))
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    if engines is None:
        progress.note(f"building the vanilla and the hooked vLLM engine of {path}")
        plain, spec = bench_engine_specs(EngineSpec(
            model=path, seed=a["seed"], max_model_len=a["max_model_len"], max_num_seqs=max(a["num_seqs"], 1),
            enforce_eager=a["enforce_eager"], kv_cache_gib=a["kv_cache_gib"], dtype=a["dtype"],
            neighbor_mode=a["neighbor_mode"]))
        vanilla, hooked = build_llm(plain, hooked=False), build_llm(spec, hooked=True)
    else:
        vanilla, hooked = engines
    prompts = _prompts(vocab, a["num_seqs"], a["prompt_len"], a["seed"])
    sampling = {"temperature": a["temperature"], "max_tokens": a["max_tokens"], "ignore_eos": True}
    vanilla_sp = SamplingParams(detokenize=False, logprobs=0, **sampling)
    mixing = MixingParams(strategy="neighbor_mix", rho=a["rho"], k=a["k"])

    def run_vanilla(sp: Any = vanilla_sp) -> tuple[float, int]:
        t0 = time.perf_counter()
        outs = vanilla.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    def run_hooked(s: dict = sampling) -> tuple[float, int, float, float]:
        t0 = time.perf_counter()
        batch = generate_rollout(hooked, prompts, s, mixing)
        return time.perf_counter() - t0, batch.num_tokens, batch.mixed_fraction, batch.timings["generation_s"]

    warm = {**sampling, "max_tokens": int(a["warmup_tokens"] or a["max_tokens"])}
    progress.note(f"warm-up round of {warm['max_tokens']} tokens (not timed)")
    # warm-up: first-call costs (compiles, the neighbor table) stay out of the timing
    run_vanilla(SamplingParams(detokenize=False, logprobs=0, **warm)), run_hooked(warm)
    host_before = _hook_stat(hooked, "hook_host_seconds")  # time in the hooks so far
    progress.begin_units()
    rounds, v_s, v_t, h_s, h_t, g_s, mixed = [], 0.0, 0, 0.0, 0, 0.0, []
    for r in range(a["rounds"]):
        # each round is vanilla, hooked, hooked, vanilla (mirrored in odd rounds): a drift in the machine's speed
        # that is linear over the round costs both engines the same, so the round's own slowdown is free of it
        # (with one run each, a drift between the two runs lands wholly on one engine)
        order = "vhhv" if r % 2 == 0 else "hvvh"
        runs: dict[str, list] = {"v": [], "h": []}
        in_order = []  # tokens/s of each run as it ran: the drift the pairing cancels, and the jitter it cannot
        for engine in order:
            runs[engine].append(run_vanilla() if engine == "v" else run_hooked())
            in_order.append(runs[engine][-1][1] / runs[engine][-1][0])
        vs, vt = (sum(x) for x in zip(*runs["v"]))
        hs, ht, mf, gs = (sum(x) for x in zip(*runs["h"]))
        mixed.append(mf / len(runs["h"]))
        v_s, v_t, h_s, h_t, g_s = v_s + vs, v_t + vt, h_s + hs, h_t + ht, g_s + gs
        rounds.append({"round": r, "order": order, "vanilla_tokens_per_s": vt / vs, "hooked_tokens_per_s": ht / hs,
                       "slowdown": _slowdown(ht, hs, vt, vs), "slowdown_generate": _slowdown(ht, gs, vt, vs),
                       "mixed_fraction": mixed[-1], "tokens_per_s_in_order": in_order})
        progress.update(r + 1)
    vanilla_tps, hooked_tps = v_t / v_s, h_t / h_s
    host_after = _hook_stat(hooked, "hook_host_seconds")
    paired = sorted(x["slowdown"] for x in rounds)
    return {
        "model": str(a["model"]), "model_path": path, "rho": a["rho"], "k": a["k"], "num_seqs": a["num_seqs"], "max_tokens": a["max_tokens"],
        "rounds": a["rounds"], "enforce_eager": a["enforce_eager"], "dtype": a["dtype"],
        "neighbor_mode": a["neighbor_mode"], "warmup_tokens": warm["max_tokens"],
        "neighbor_build_seconds": _hook_stat(hooked, "neighbor_build_seconds"),  # 0.0 in lazy mode
        "vanilla_tokens_per_s": vanilla_tps, "hooked_tokens_per_s": hooked_tps,
        "slowdown": _slowdown(h_t, h_s, v_t, v_s),
        # the engine's generate call alone (hook in the engine), without resolving records and building the batch
        "slowdown_generate": _slowdown(h_t, g_s, v_t, v_s),
        # the hook's own share of the hooked generate calls: its time measured inside the engine, free of the
        # noise between two engines' runs (the embedding's in-graph mixing is not in it; the end-to-end numbers are)
        "hook_host_share": None if host_before is None or host_after is None else (host_after - host_before) / g_s,
        # robust to a noisy round on a shared machine: the median of the per-round (back-to-back) slowdowns
        "slowdown_median_of_rounds": paired[len(paired) // 2] if len(paired) % 2 else
        0.5 * (paired[len(paired) // 2 - 1] + paired[len(paired) // 2]),
        # what the rounds can resolve: a 95% t-interval of the mean round slowdown (None with one round). On a
        # 2-core machine whose runs jitter by 5-10%, it is several points wide at 5 rounds
        "slowdown_ci95_of_rounds": t_interval_95([x["slowdown"] for x in rounds]),
        "mixed_fraction": sum(mixed) / len(mixed), "per_round": rounds,
    }


# Student's t, 97.5% quantile, for 1..30 degrees of freedom (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval_95(values: list[float]) -> list[float] | None:
    """[low, high] of a 95% Student-t interval for the mean of ``values``; None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * sd / n ** 0.5
    return [mean - half, mean + half]


def bench_engine_specs(spec: Any) -> tuple[Any, Any]:
    """(vanilla spec, hooked spec) from one EngineSpec. The hooked engine never loads a tokenizer (its frontend must
    not decode virtual ids); the vanilla one skips it too, so the two differ by the hook alone and not by the
    frontend's per-token work."""
    return replace(spec, extra=(*spec.extra, ("skip_tokenizer_init", True))), spec


def _slowdown(hooked_tokens: float, hooked_s: float, vanilla_tokens: float, vanilla_s: float) -> float:
    """1 - hooked tokens/s over vanilla tokens/s."""
    return 1.0 - (hooked_tokens / hooked_s) / (vanilla_tokens / vanilla_s)


def _hook_stat(hooked: Any, key: str) -> float | None:
    """One number of the hooked engine's ``ngrpo_stats``, or None if it cannot say."""
    from ngrpo_ray.engine.records_client import check

    try:
        return float(check(hooked.collective_rpc("ngrpo_stats"))[key])
    except Exception:  # noqa: BLE001 - a report field, never a reason to lose the measurement
        return None


def add_hook_overhead_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the lead's CLI wiring (``ngrpo bench hook-overhead``)."""
    parser.add_argument("--model", default=DEFAULTS["model"],
                        help="the demo model name (default: %(default)s, offline), a local folder or an HF id")
    for name in ("rho", "temperature", "kv_cache_gib"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=DEFAULTS[name])
    for name in ("k", "num_seqs", "max_tokens", "prompt_len", "rounds", "seed", "max_model_len", "warmup_tokens"):
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=DEFAULTS[name])
    parser.add_argument("--neighbor-mode", dest="neighbor_mode", choices=("full", "lazy"),
                        default=DEFAULTS["neighbor_mode"],
                        help="hooked engine's neighbor tables (default: the engine's, lazy on CPU, full on GPU)")
    parser.add_argument("--enforce-eager", dest="enforce_eager", action="store_true",
                        help="no torch.compile / graph capture (faster start, slower steps)")
    parser.add_argument("--dtype", default=DEFAULTS["dtype"])


def run_neighbor_table_bench(vocab: int = 151936, dim: int = 1536, k: int = 3, metric: str = "cosine") -> dict:
    """Seconds of one full neighbor-table build on a random [vocab, dim] matrix (default: the R1-Distill-Qwen-1.5B
    shape, about 15-18 minutes on a 2-core CPU), with rows done, elapsed and ETA on stderr while it runs."""
    from ngrpo_ray.core.neighbors import time_full_build
    from ngrpo_ray.progress import Progress

    progress = Progress(vocab, f"bench neighbor-table rows (V={vocab}, d={dim})", quiet_s=5.0, every_s=30.0)
    seconds = time_full_build(V=vocab, d=dim, k=k, metric=metric, on_chunk=lambda done, _: progress.update(done))
    return {"vocab": vocab, "dim": dim, "k": k, "metric": metric, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> None:
    json_only_stdout()
    parser = argparse.ArgumentParser(prog="ngrpo bench hook-overhead")
    add_hook_overhead_arguments(parser)
    args = parser.parse_args(argv)
    print_bench_json(lambda: run_hook_overhead_bench(args))


if __name__ == "__main__":
    main()
