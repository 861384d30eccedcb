"""``ngrpo bench sync``: the versioned weight sync against a raw broadcast of the same bytes, in one run.

One trainer worker (Ray Train + DeepSpeed) and one rollout engine (vLLM) joined through vLLM's weight-transfer API
with this project's CPU backend (``ngrpo_gloo``), as the training driver does. Rounds interleave (a) a real sync
(trainer rank 0 drives the engine's start / update / finish; the engine receives, loads, re-packs its CPU GEMM
weights, rebuilds its neighbor table and resets its prefix cache) and (b) a raw broadcast of exactly as many bytes,
in chunks of the bucket size, on the same gloo group, so machine noise hits both alike. The engine shares the
trainer's host, so the sync's bytes go through shared memory (``transport``), unless ``--transport gloo`` sends them
over the gloo group as to an engine on another node. Reported:
- ``sync_send_s``: the trainer's wall time moving the bytes (reading the parameters; shared memory: copying them
  into the segment and signalling each chunk; gloo: packing the small ones and every broadcast), the transport part
  of a sync;
- ``sync_total_s``: the driver's wall time for the whole sync, control plane and the engine's load included;
- ``engine_load_s``: the engine's own work beyond waiting for bytes (``load_weights`` into the vLLM model, the CPU
  GEMM re-pack, the neighbor refresh), with its parts (``engine_*_s``) per round;
- ``raw_s``: the trainer's wall time for the raw broadcast (buffers allocated before the clock starts);
- ``ratio_send`` = sync_send_s / raw_s (what the API path adds over the transport) and
  ``ratio_total`` = sync_total_s / raw_s (what a training iteration pays over the transport floor).
Sums over rounds give the ratios; per-round numbers are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import ray

from ngrpo_ray.distributed.weight_sync import GLOO_BACKEND

DEFAULTS = dict(model="smollm2-135m-instruct", rounds=3, bucket_mb=64.0, num_cpus=4, timeout_s=600.0,
                cache_dir="~/.cache/ngrpo_ray/models", transport="auto")
TRANSPORTS = ("auto", "gloo")  # auto: shared memory when the engine shares the trainer's host (it does here)


def _engine_spec(model_path: str) -> dict[str, Any]:
    # Small KV cache and context: the engine only receives weights here, it never generates.
    return {"model": model_path, "seed": 0, "max_model_len": 256, "max_num_seqs": 4, "enforce_eager": True,
            "kv_cache_gib": 0.25, "dtype": "float32", "weight_transfer_backend": GLOO_BACKEND}


def _trainer_config(model_path: str):
    from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
    from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig

    return TrainerGroupConfig(model_path=model_path, num_workers=1, torch_threads=1, ref_model=False,
                              deepspeed=DeepSpeedSettings(zero_stage=0, dtype="fp32"))


def _one_round(trainer, fleet, version: int, bucket_mb: float, timeout_s: float) -> dict[str, float]:
    engine = fleet.engines[0]
    t0 = time.perf_counter()
    sent = trainer.wait(trainer.start_sync(version), timeout_s=timeout_s)[0]
    sync_total = time.perf_counter() - t0
    got = sent["engines"][0]
    nbytes = int(sent["bytes"])
    if int(got["bytes"]) != nbytes or int(got["version"]) != version:
        raise RuntimeError(f"engine received v{got['version']} / {got['bytes']} bytes, trainer sent "
                           f"v{version} / {nbytes} bytes")

    t0 = time.perf_counter()
    handle = trainer.start_raw_broadcast(nbytes, chunk_mb=bucket_mb)
    raw_engine = engine.raw_broadcast.remote(nbytes, bucket_mb)
    raw = trainer.wait(handle, timeout_s=timeout_s)[0]
    raw_recv = ray.get(raw_engine, timeout=timeout_s)
    raw_wall = time.perf_counter() - t0
    return {"version": version, "bytes": nbytes, "messages": int(sent["messages"]), "transport": sent["transport"],
            "sync_send_s": float(sent["broadcast_seconds"]), "sync_trainer_s": float(sent["seconds"]),
            "sync_total_s": sync_total, "engine_load_s": float(got["engine_load_seconds"]),
            "engine_wait_s": float(got["receive_wait_seconds"]), "engine_load_weights_s": float(got["load_seconds"]),
            "engine_repack_s": float(got["repack_seconds"]), "engine_repack_page_faults": int(got["repack_page_faults"]),
            "engine_refresh_s": float(got["refresh_seconds"]),
            "engine_finish_s": float(got["finish_seconds"]), "raw_s": float(raw["seconds"]),
            "raw_engine_s": float(raw_recv["seconds"]), "raw_wall_s": raw_wall}


def run_sync_bench(model: Any = None, rounds: int = 3, bucket_mb: float = 64.0, num_cpus: int = 4,
                   timeout_s: float = 600.0, cache_dir: str = "~/.cache/ngrpo_ray/models",
                   transport: str = "auto") -> dict:
    """Start a 1-worker trainer group and a 1-engine fleet on ``model`` (a path, the demo name, or a Config whose
    model.path is used), open the sync group, run ``rounds`` interleaved sync / raw rounds, and return the JSON.

    Attaches to a running Ray (``ray.is_initialized()`` or RAY_ADDRESS) or starts a local one it shuts down after."""
    from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
    from ngrpo_ray.distributed.trainer_group import TrainerGroup
    from ngrpo_ray.models.offline import resolve_model
    from ngrpo_ray.progress import Progress

    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    progress = Progress(rounds, "bench sync rounds", quiet_s=0.0, every_s=0.0)
    if model is None:
        model = DEFAULTS["model"]
    if hasattr(model, "model"):  # a Config
        cache_dir, model = model.model.cache_dir, model.model.path
    path = resolve_model(str(model), cache_dir)
    progress.note(f"starting Ray, one vLLM engine and one DeepSpeed trainer worker on {path}")
    own_ray = not ray.is_initialized()
    if own_ray and os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    elif own_ray:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    trainer = fleet = None
    started = time.perf_counter()
    try:
        fleet = RolloutFleet(_engine_spec(path), 1, num_cpus=1.0)
        trainer = TrainerGroup(_trainer_config(path)).start()
        backend = trainer.open_weight_sync(fleet.engines, timeout_s=timeout_s, bucket_mb=bucket_mb,
                                           shared_memory=transport == "auto")
        startup_s = time.perf_counter() - started
        progress.note("sync group open; timed rounds start")
        progress.begin_units()
        per_round = []
        for v in range(1, rounds + 1):
            per_round.append(_one_round(trainer, fleet, v, bucket_mb, timeout_s))
            progress.update(v)
    finally:
        for close in (lambda: trainer and trainer.shutdown(), lambda: fleet and fleet.shutdown()):
            try:
                close()
            except Exception as exc:  # noqa: BLE001 - keep closing; the measurement (or its error) stands
                print(f"warning: shutdown step failed: {exc!r}", file=sys.stderr)  # stdout is the JSON
        if own_ray:
            ray.shutdown()

    def total(key: str) -> float:
        return sum(r[key] for r in per_round)

    nbytes = per_round[0]["bytes"]
    return {
        "model": str(model), "model_path": path, "rounds": rounds, "bucket_mb": bucket_mb,
        "backend": backend, "transport": per_round[0]["transport"], "bytes": nbytes,
        "messages": per_round[0]["messages"],
        "sync_send_s": total("sync_send_s") / rounds, "sync_total_s": total("sync_total_s") / rounds,
        "engine_load_s": total("engine_load_s") / rounds, "raw_s": total("raw_s") / rounds,
        "sync_send_gb_per_s": nbytes * rounds / total("sync_send_s") / 1e9,
        "raw_gb_per_s": nbytes * rounds / total("raw_s") / 1e9,
        "ratio_send": total("sync_send_s") / total("raw_s"),
        "ratio_total": total("sync_total_s") / total("raw_s"),
        "ratio_engine_load": total("engine_load_s") / total("raw_s"),
        "startup_s": startup_s, "per_round": per_round,
    }


def add_sync_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the lead's CLI wiring (``ngrpo bench sync``)."""
    parser.add_argument("--model", default=DEFAULTS["model"], help="model path or the demo model name")
    parser.add_argument("--rounds", type=int, default=DEFAULTS["rounds"])
    parser.add_argument("--bucket-mb", dest="bucket_mb", type=float, default=DEFAULTS["bucket_mb"])
    parser.add_argument("--num-cpus", dest="num_cpus", type=int, default=DEFAULTS["num_cpus"],
                        help="CPUs of the local Ray cluster started when none is running")
    parser.add_argument("--timeout-s", dest="timeout_s", type=float, default=DEFAULTS["timeout_s"])
    parser.add_argument("--transport", choices=TRANSPORTS, default=DEFAULTS["transport"],
                        help="auto: the bytes through shared memory when the engine shares the trainer's host; gloo: "
                             "over the gloo group, as to an engine on another node")


def sync_bench_from_args(args: Any) -> dict:
    """Run the benchmark from parsed flags (an argparse Namespace or a dict) and return its JSON."""
    a = dict(DEFAULTS)
    a.update({k: v for k, v in (vars(args) if isinstance(args, argparse.Namespace) else dict(args)).items()
              if k in DEFAULTS and v is not None})
    return run_sync_bench(a["model"], a["rounds"], a["bucket_mb"], a["num_cpus"], a["timeout_s"], a["cache_dir"],
                          a["transport"])


def main(argv: list[str] | None = None) -> int:
    from ngrpo_ray.cli_bench import json_only_stdout, print_bench_json

    json_only_stdout()
    parser = argparse.ArgumentParser(prog="ngrpo bench sync", description=__doc__.split("\n\n")[0])
    add_sync_bench_arguments(parser)
    args = parser.parse_args(argv)
    print_bench_json(lambda: sync_bench_from_args(args))  # Ray forwards the workers' prints to the driver's stdout
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
