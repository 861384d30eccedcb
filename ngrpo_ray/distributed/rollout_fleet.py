"""Several RolloutEngine actors behind one call: prompts spread over engines, results kept in prompt order.

`generate` splits the prompts into contiguous chunks, hands each chunk to the engine with the least outstanding work
(prompts in flight), and returns one ObjectRef per chunk in prompt order, with the offset of each chunk's first
prompt, so the caller can map a chunk's local group index back to the global prompt index. Tensors stay in the
object store: the driver only holds refs.

Fault tolerance: engines are Ray actors with `max_restarts` (Ray re-runs `__init__`, which loads the model at
spec['model'] again) and `max_task_retries=0` (a rollout is not silently re-run on a half-synced engine). `collect`
is the one place chunk results are resolved: when a chunk's engine died mid-rollout it waits for the restart, has the
engine re-synced to the current policy (`resync` hook, set by the driver), re-issues the chunk, and records the
restart in `restarts`. Callers hand only the chunks `collect` returns to later consumers (the trainer).
An engine that died between rollouts (during the train step, say) is found by `find_restarted` (each engine start has
its own incarnation id), which the driver calls before every weight sync.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import ray
from ray.exceptions import RayActorError

from ngrpo_ray.core.ring_budget import calls_needed
from ngrpo_ray.distributed.rollout_engine import StalePolicyVersion
from ngrpo_ray.distributed.synced_engine import SyncedRolloutEngine
from ngrpo_ray.engine.llm_factory import EngineSpec
from ngrpo_ray.engine.request_options import to_wire

# ActorDiedError and ActorUnavailableError are RayActorErrors; a consumer task whose input came from a dead engine
# raises RayTaskError(ActorUnavailableError), which is one too. A chunk queued while Ray restarted its engine runs on
# the restarted (initial) model and is refused as StalePolicyVersion: the same recovery applies.
ENGINE_LOST = (RayActorError, StalePolicyVersion)


@dataclass
class Chunk:
    ref: ray.ObjectRef
    first_prompt: int
    num_prompts: int
    engine: int
    request: tuple = field(default=(), repr=False)  # generate's arguments, kept to re-issue the chunk
    incarnation: int = 0  # the engine's restart count when the chunk was issued
    attempt: int = 0

    @property
    def policy_version(self) -> int:
        """The policy version its responses were drawn with (generate's argument)."""
        return int(self.request[3])


class RolloutFleet:
    def __init__(self, spec: dict, num_engines: int, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 policy_version: int = 0, max_restarts: int = 2, restart_timeout_s: float = 900.0,
                 actor_options: Sequence[dict] | None = None):
        """`actor_options`: per engine, its seat from the placement plan (reservation.engine_actor_options); without
        it every engine asks Ray for num_cpus / num_gpus directly (evaluation, benchmarks)."""
        self.spec = spec
        if actor_options is None:
            actor_options = [{"num_cpus": num_cpus, "num_gpus": num_gpus}] * num_engines
        if len(actor_options) != num_engines:
            raise ValueError(f"{len(actor_options)} engine seats for {num_engines} engines")
        self.engines = [
            SyncedRolloutEngine.options(**seat, max_restarts=max_restarts, max_task_retries=0).remote(spec, policy_version)
            for seat in actor_options
        ]
        health = ray.get([e.health.remote() for e in self.engines])  # fail here, clearly, if one cannot start
        self.engine_ids = [h["incarnation"] for h in health]
        self.start_health = health  # each engine's first report (its KV cache size, start time)
        self.prompts_served = [0] * num_engines  # prompts issued per engine (a re-issued chunk counts again)
        self.restart_timeout_s = restart_timeout_s
        self.incarnations = [0] * num_engines  # restarts seen per engine
        self.restarts: list[dict] = []
        # resync(engine_indices, policy_version): bring the restarted engines (and the sync group) to the current
        # policy before they serve again. None (evaluation): a restarted engine's initial model is the one asked for.
        self.resync: Callable[[list[int], int], None] | None = None
        self.iteration: int | None = None  # set by the driver; recorded with each restart
        self.serving_version = int(policy_version)  # the version the engines were last sent (PolicySync.sync_weights)
        # Asynchronous rollouts: a chunk issued at version v may be re-issued after the fleet moved to v+1 (the sync
        # between two rollouts); it is then generated, and tagged, with the version the fleet serves now.
        self.reissue_at_serving_version = False

    def __len__(self) -> int:
        return len(self.engines)

    # -- generation ----------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: dict, mixing: Any, policy_version: int,
                 group_size: int, chunks_per_engine: int = 1, purpose: str = "train",
                 call: int | None = None) -> list[Chunk]:
        """``purpose`` / ``call`` (default: the policy version) name the gate streams (core.gate_stream); each chunk
        tells its engine where its prompts start, so a response's stream does not depend on the chunking. More chunks
        than ``chunks_per_engine`` per engine are cut when one call's mixed steps could overflow the engines' ring
        table (core.ring_budget)."""
        ring = calls_needed(len(prompts), group_size, int(sampling.get("max_tokens") or 16), _rho(mixing),
                            int(self.spec.get("table_capacity", EngineSpec.table_capacity)))
        n_chunks = max(1, min(len(prompts), max(len(self.engines) * chunks_per_engine, ring)))
        bounds = [round(i * len(prompts) / n_chunks) for i in range(n_chunks + 1)]
        chunks: list[Chunk] = []
        call = policy_version if call is None else call
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            stream = {"purpose": purpose, "call": int(call), "first_prompt": lo}
            request = ([list(p) for p in prompts[lo:hi]], sampling, mixing, policy_version, group_size, stream)
            chunks.append(self._issue(request, lo, self._least_loaded(chunks)))
        return chunks

    def _issue(self, request: tuple, first_prompt: int, engine: int, attempt: int = 0) -> Chunk:
        n = len(request[0])
        self.prompts_served[engine] += n
        ref = self.engines[engine].generate.remote(*request)
        return Chunk(ref, first_prompt, n, engine, request, self.incarnations[engine], attempt)

    def _least_loaded(self, in_flight: Sequence[Chunk]) -> int:
        outstanding = [0] * len(self.engines)
        for c in in_flight:
            outstanding[c.engine] += c.num_prompts
        return min(range(len(self.engines)), key=lambda i: (outstanding[i], i))

    def collect(self, chunks: Sequence[Chunk], consume: Callable[[Chunk], ray.ObjectRef] | None = None,
                submitted: Sequence[ray.ObjectRef] | None = None) -> tuple[list[Chunk], list[Any]]:
        """Wait for every chunk; re-issue those whose engine died. Returns (chunks, results), both in prompt order.

        `consume(chunk)` submits the task that uses the chunk (e.g. the scorer) and returns its ref: it runs as soon
        as its chunk is done, and a dead engine shows up as its error, so the driver never fetches a batch.
        Without `consume` the results are the batches themselves. The returned chunks hold only valid refs.
        `submitted`: the consumers' refs, already submitted when the chunks were issued (asynchronous rollouts)."""
        consume = consume or (lambda c: c.ref)
        chunks = list(chunks)
        first = list(submitted) if submitted is not None else [consume(c) for c in chunks]
        pending = {ref: i for i, ref in enumerate(first)}
        results: list[Any] = [None] * len(chunks)
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready)
            try:
                results[i] = ray.get(ready)
            except ENGINE_LOST:
                chunks[i] = self._reissue(chunks[i], [chunks[j] for j in pending.values()])
                pending[consume(chunks[i])] = i
        return chunks, results

    # -- recovery ------------------------------------------------------------------------------------------------
    def _reissue(self, chunk: Chunk, in_flight: list[Chunk]) -> Chunk:
        if chunk.attempt >= len(self.engines) + 2:
            raise RuntimeError(f"rollout chunk at prompt {chunk.first_prompt} failed {chunk.attempt + 1} times")
        request = chunk.request
        if self.reissue_at_serving_version and chunk.policy_version != self.serving_version:
            request = request[:3] + (self.serving_version,) + request[4:]
        if chunk.incarnation == self.incarnations[chunk.engine]:  # not recovered yet (its other chunks may have)
            self._recover(chunk.engine, policy_version=request[3], in_flight=in_flight)
        engine = self._least_loaded(in_flight)
        return self._issue(request, chunk.first_prompt, engine, chunk.attempt + 1)

    def _recover(self, engine: int, policy_version: int, in_flight: list[Chunk]) -> None:
        t0 = time.perf_counter()
        health = self._wait_alive(engine)
        self.incarnations[engine] += 1
        self.engine_ids[engine] = health["incarnation"]
        if self.resync is not None:
            # Re-syncing rebuilds the group with every engine; an engine joins only after its current rollout, so
            # wait for those first (fetch_local=False: nothing comes to the driver).
            refs = [c.ref for c in in_flight if c.engine != engine]
            if refs:
                ray.wait(refs, num_returns=len(refs), fetch_local=False)
            self.resync([engine], policy_version)
        elif health["policy_version"] != policy_version:
            raise RuntimeError(f"engine {engine} restarted at policy version {health['policy_version']}, the rollout "
                               f"needs {policy_version}, and the fleet has no resync hook")
        served = ray.get(self.engines[engine].health.remote())["policy_version"]  # what it serves from now on
        self.record_restart(engine, "rollout", policy_version, int(served), t0)

    def record_restart(self, engine: int, phase: str, policy_version: int, served: int, t0: float) -> None:
        self.restarts.append({"kind": "engine", "engine": engine, "phase": phase, "iteration": self.iteration,
                              "policy_version": policy_version, "engine_policy_version": served,
                              "recover_s": round(time.perf_counter() - t0, 3), "time": time.time()})

    def find_restarted(self) -> list[int]:
        """Engines Ray restarted since the fleet last saw them (e.g. killed during the train step), each waited for
        until it is back. They hold the initial model and are outside the weight-sync group: the caller re-syncs."""
        restarted = []
        for i in range(len(self.engines)):
            health = self._wait_alive(i)
            if health["incarnation"] != self.engine_ids[i]:
                self.engine_ids[i] = health["incarnation"]
                self.incarnations[i] += 1
                restarted.append(i)
        return restarted

    def _wait_alive(self, engine: int) -> dict:
        """The engine's health once Ray restarted it (its __init__ loads the model: minutes on a busy CPU)."""
        deadline = time.monotonic() + self.restart_timeout_s
        died_since = None  # ActorDiedError for a while means its restarts are used up
        while True:
            try:
                return ray.get(self.engines[engine].health.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (RayActorError, ray.exceptions.GetTimeoutError) as exc:
                now = time.monotonic()
                died = isinstance(exc, ray.exceptions.ActorDiedError)
                died_since = (died_since or now) if died else None
                if now > deadline or (died_since is not None and now - died_since > 10.0):
                    raise RuntimeError(f"rollout engine {engine} did not come back (restarts used up, or "
                                       f"{self.restart_timeout_s:.0f}s passed): {exc}") from exc
                time.sleep(1.0)

    def policy_versions(self) -> list[int]:
        return [int(h["policy_version"]) for h in ray.get([e.health.remote() for e in self.engines])]

    def sleep(self) -> list[dict]:
        """Colocated: every engine frees its GPU memory before the trainer's update (a no-op without sleep mode)."""
        return ray.get([e.sleep.remote() for e in self.engines])

    def wake_up(self, tags: list[str] | None = None) -> list[dict]:
        """Colocated: reallocate the engines' ``tags`` ("weights", "kv_cache"; all when None)."""
        return ray.get([e.wake_up.remote(tags) for e in self.engines])

    def shutdown(self) -> None:
        for e in self.engines:
            try:
                ray.get(e.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the actor may already be gone; kill below either way
                pass
            ray.kill(e)


def _rho(mixing: Any) -> float:
    """The gate probability of a call's mixing options (0 for none or "sample")."""
    return 0.0 if mixing is None else float(to_wire(mixing)["rho"])
