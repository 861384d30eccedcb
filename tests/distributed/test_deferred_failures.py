"""weight_client.DeferredFailures: an engine's error during vLLM's ipc send is kept, the update's later calls are
skipped (the sender goes on through the handle all-gathers every trainer rank joins), and it is raised after."""

import pytest

from ngrpo_ray.distributed.weight_client import DeferredFailures


class _Engines:
    """Records the calls; the second update_weights fails (an engine died mid-sync)."""

    def __init__(self):
        self.calls, self.updates = [], 0

    def init_weight_transfer_engine(self, info):
        self.calls.append("init")
        if info.get("refuse"):
            raise RuntimeError("refused at open")

    def start_weight_update(self):
        self.calls.append("start")

    def update_weights(self, info):
        self.updates += 1
        self.calls.append(f"update {info['chunk']}")
        if self.updates == 2:
            raise RuntimeError("engine 1 died")

    def finish_weight_update(self, weight_version=None):
        self.calls.append("finish")

    def shutdown_weight_transfer_engine(self):
        self.calls.append("shutdown")


def test_the_failure_is_kept_later_calls_skipped_and_raised_after_the_send():
    engines = _Engines()
    client = DeferredFailures(engines)
    client.start_weight_update()
    for chunk in range(4):  # the ipc sender: all-gather the chunk's handles with every rank, then ship them
        client.update_weights({"chunk": chunk})
    client.finish_weight_update("3")
    assert engines.calls == ["start", "update 0", "update 1"]  # nothing shipped after the failure
    with pytest.raises(RuntimeError, match="engine 1 died"):
        client.raise_failure()
    client.raise_failure()  # raised once: the next sync starts clean


def test_opening_and_closing_are_not_deferred():
    engines = _Engines()
    client = DeferredFailures(engines)
    with pytest.raises(RuntimeError, match="refused at open"):
        client.init_weight_transfer_engine({"refuse": True})
    client.shutdown_weight_transfer_engine()
    assert engines.calls == ["init", "shutdown"]
