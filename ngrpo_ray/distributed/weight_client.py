"""The trainer's handle on every engine's weight-sync control plane: a ``VLLMWeightSyncClient`` (vLLM's structural
protocol: ``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``, ``finish_weight_update``)
over the RolloutEngine actors, which a trainer-side vLLM weight-transfer engine drives from trainer rank 0.

Differences from vLLM's ``RayVLLMWeightSyncClient``, and why:
- every wait has a deadline (cluster.sync_timeout_s) and a timeout names the step and the engines;
- independent engines (not one vLLM data-parallel deployment) each get their own ranks in the transfer group:
  engine i's workers start at ``rank_offset + i * tp``;
- ``finish_weight_update`` carries the policy version and keeps each engine's reply (its load timings).
"""

from __future__ import annotations

from typing import Any, Sequence

import ray

from ngrpo_ray.distributed.weight_sync import WeightSyncTimeout


class FleetWeightClient:
    def __init__(self, engines: Sequence[Any], timeout_s: float, tp: int = 1):
        self.engines, self.timeout_s, self.tp = list(engines), float(timeout_s), int(tp)
        self.version: int | None = None  # the policy version of the update being sent (set before send_weights)
        self.engine_stats: list[dict] = []

    def _all(self, step: str, refs: list) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            late = [i for i, r in enumerate(refs) if not ray.wait([r], timeout=0)[0]]
            raise WeightSyncTimeout(f"engine(s) {late} did not finish {step} within cluster.sync_timeout_s="
                                    f"{self.timeout_s:.1f}s (dead, or blocked in the transfer?)") from exc

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        refs = []
        for i, engine in enumerate(self.engines):
            info = dict(init_info)
            if "rank_offset" in info:
                info["rank_offset"] = int(info["rank_offset"]) + i * self.tp
            refs.append(engine.init_weight_transfer_engine.remote(info))
        self._all("joining the weight transfer", refs)

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [e.start_weight_update.remote() for e in self.engines])

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._all("update_weights (receiving and loading)", [e.update_weights.remote(update_info)
                                                             for e in self.engines])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = int(weight_version) if weight_version is not None else self.version
        if version is None:
            raise ValueError("finish_weight_update needs the policy version (set client.version before sending)")
        self.engine_stats = self._all("finish_weight_update (neighbor tables, prefix cache)",
                                      [e.finish_weight_update.remote(version) for e in self.engines])

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine", [e.shutdown_weight_transfer_engine.remote()
                                                      for e in self.engines])


class DeferredFailures:
    """A weight-sync client for vLLM's ipc sender: once a call to the engines fails, the rest of the update's calls
    are skipped and the error is kept, to be raised after the send (``raise_failure``). Between its calls to the
    engines the ipc sender all-gathers CUDA IPC handles with every trainer rank and ends with a barrier; a sender that
    stopped at the failure would leave the other ranks waiting in the next collective. Opening the transfer is not
    deferred: it has no collective around it, and its error belongs at open time."""

    def __init__(self, client: Any):
        self.client = client
        self.failure: BaseException | None = None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def _call(self, method: str, *args: Any) -> None:
        if self.failure is not None:
            return
        try:
            getattr(self.client, method)(*args)
        except Exception as exc:  # noqa: BLE001 - kept and raised after the send
            self.failure = exc

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._call("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.client.shutdown_weight_transfer_engine()

    def raise_failure(self) -> None:
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure
