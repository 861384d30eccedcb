"""One-step-off asynchronous rollouts (trainer.async_rollouts): the engines generate iteration i+1 with policy
version v while the trainer turns iteration i into v+1.

Per iteration i (the driver's `learn` does the rest, as in the synchronous driver):
  1. take rollout i: issued during the previous iteration (drawn with v-1, staleness 1), or issued now (the first
     iteration of a session, or after a trainer restart: drawn with v, staleness 0);
  2. issue rollout i+1 with version v (non-blocking refs; its grading is submitted too) -- it runs during the update;
  3. drop the samples more than trainer.max_staleness versions behind (training.staleness) and log the staleness;
  4. train on rollout i -> v+1; then WAIT for rollout i+1 to finish generating, and only then send v+1 to the engines
     (the weight sync never overlaps a rollout), validate if due, log, checkpoint.
The loss's pi_old must be the behaviour policy for a sample drawn one version ago: the config requires
trainer.old_logprobs: rollout (the engine's recorded log-probs) or a rollout correction (decoupled: the recomputed
pi_old, weighted by pi_old / pi_behaviour from the same recorded log-probs); config/load.py refuses the rest.
The records (token ids, candidates, alphas) do not depend on the trainer's version, so the trainer rebuilds exactly
the mixtures the engine fed. A checkpoint holds no rollout: on resume the rollout that was in flight is issued
again, for the same iteration and so the same prompts (training.prompt_order), drawn with the resumed policy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import ray

from ngrpo_ray.distributed import components
from ngrpo_ray.distributed.driver import batch_problems, learn
from ngrpo_ray.distributed.sample_and_score import InFlight, Scored, finish_scoring, start_scoring
from ngrpo_ray.distributed.trainer_config import TrainerRestarted
from ngrpo_ray.training.staleness import keep_mask, staleness_metrics

if TYPE_CHECKING:
    from ngrpo_ray.distributed.session import Session


class AsyncRollouts:
    """The driver's iteration in asynchronous mode: call it as `iteration(session, it)` is called."""

    def __init__(self, session: "Session", end: int):
        self.session, self.end = session, end
        self.in_flight: tuple[int, InFlight] | None = None  # (0-based iteration, its rollout)
        # a chunk re-issued after an engine restart is drawn with the version the fleet serves by then
        session.fleet.reissue_at_serving_version = True

    def __call__(self, session: "Session", it: int) -> dict[str, float]:
        try:
            return self._iteration(it)
        except TrainerRestarted:  # recovery rolls the policy back and syncs: the engines must be idle first
            self.drop_in_flight()
            session.fleet.iteration = it + 1  # the restart record names the iteration that failed, not the next
            raise

    def _iteration(self, it: int) -> dict[str, float]:
        s, t_start = self.session, time.perf_counter()
        version = s.state.policy_version
        t0 = time.perf_counter()
        scored = finish_scoring(s.fleet, s.scorer, self._take(it, version))
        t_rollout = time.perf_counter() - t0
        if it + 1 < self.end:
            self.in_flight = (it + 1, self._issue(it + 1, version))
        scored, info = drop_stale(scored, version, s.cfg.trainer.max_staleness, s.cfg.rollout.group_size)
        return learn(s, it, scored, info, t_rollout, t_start, before_sync=self._wait_in_flight)

    def _take(self, it: int, version: int) -> InFlight:
        if self.in_flight is not None and self.in_flight[0] == it:
            flight, self.in_flight = self.in_flight[1], None
            return flight
        self.drop_in_flight()
        return self._issue(it, version)

    def _issue(self, it: int, version: int) -> InFlight:
        s, data = self.session, self.session.train_set
        problems = batch_problems(s, it)
        # call=it: the gate streams are keyed by the iteration, as in the synchronous driver (where version == it)
        return start_scoring(s.fleet, s.scorer, [data.prompts[i] for i in problems], [data.golds[i] for i in problems],
                             s.cfg.rollout.group_size, components.rollout_sampling(s.cfg), s.mixing, version,
                             data.kind, call=it)

    def _wait_in_flight(self) -> dict[str, float]:
        """Between the update and the weight sync: the rollout in flight must end first (fetch_local=False:
        nothing comes to the driver; a chunk whose engine died is ready too, and re-issued when collected)."""
        t0 = time.perf_counter()
        if self.in_flight is not None:
            refs = [c.ref for c in self.in_flight[1].chunks]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        return {"time/rollout_wait_s": time.perf_counter() - t0}

    def drop_in_flight(self) -> None:
        """Forget the rollout in flight (after it ended: the engines are idle)."""
        if self.in_flight is not None:
            self._wait_in_flight()
            self.in_flight = None


def drop_stale(scored: Scored, trainer_version: int, max_staleness: int,
               group_size: int) -> tuple[Scored, dict[str, float]]:
    """The rollout without the samples more than `max_staleness` versions behind the trainer, and the staleness
    metrics. Versions are per chunk (a chunk's whole groups share one), so whole chunks and groups are dropped."""
    per_chunk = [c.num_prompts * group_size for c in scored.chunks]
    versions = np.repeat([c.policy_version for c in scored.chunks], per_chunk)
    if len(versions) != len(scored.rewards):
        raise ValueError(f"{len(versions)} version tags for {len(scored.rewards)} samples")
    keep = keep_mask(versions, trainer_version, max_staleness)
    info = staleness_metrics(versions, trainer_version, keep)
    if keep.all():
        return scored, info
    if not keep.any():
        raise RuntimeError(f"every sample of the rollout is more than trainer.max_staleness={max_staleness} "
                           f"versions behind the trainer's {trainer_version}")
    rows = {f.name: getattr(scored, f.name)[keep] for f in dataclasses.fields(scored)
            if isinstance(getattr(scored, f.name), np.ndarray)}
    chunks = [c for c, k in zip(scored.chunks, np.split(keep, np.cumsum(per_chunk)[:-1])) if k.all()]
    status = [st for st, k in zip(scored.status, keep) if k]
    return dataclasses.replace(scored, chunks=chunks, status=status, **rows), info
