"""The trainer group's command channel: an async Ray actor the driver puts commands into and the ranks take them
from, with per-command result slots (see ``trainer_group`` for the design)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import ray


class CommandChannel:
    """Per-rank command queues and per-command result slots (async actor: waits do not block each other).

    Generations: Ray Train restarts the whole worker group after a worker dies (FailureConfig). Each new worker
    registers and gets the group's new generation; commands carry the generation the driver knows. A command from
    before the restart is dropped unseen, a worker of a replaced group takes nothing more, and
    ``put`` refuses commands for an old generation, so nothing runs on a restarted group (which holds the initial
    model) until the driver has seen the restart and restored the last checkpoint."""

    def __init__(self, world_size: int):
        self.queues: list[collections.deque] = [collections.deque() for _ in range(world_size)]
        self.ready = [asyncio.Condition() for _ in range(world_size)]
        self.attempts = [0] * world_size
        self.generation = 0
        self.results: dict[int, dict[int, Any]] = {}
        self.events: dict[int, asyncio.Event] = {}

    def _event(self, cmd_id: int) -> asyncio.Event:
        return self.events.setdefault(cmd_id, asyncio.Event())

    async def register(self, rank: int) -> int:
        """A worker (re)started: its generation (0 for the first group, 1 after one restart, ...)."""
        self.attempts[rank] += 1
        self.generation = max(self.generation, self.attempts[rank] - 1)
        return self.attempts[rank] - 1

    async def get_generation(self) -> int:
        return self.generation

    async def registered(self) -> int:
        """How many ranks have started (Ray placed their bundles and ran the loop)."""
        return sum(1 for a in self.attempts if a > 0)

    async def put(self, ranks: list[int], command: dict) -> bool:
        if command["generation"] != self.generation:
            return False  # the group restarted since the driver last looked
        for r in ranks:
            async with self.ready[r]:
                self.queues[r].append(command)
                self.ready[r].notify_all()
        return True

    async def next_command(self, rank: int, generation: int) -> dict:
        queue = self.queues[rank]
        async with self.ready[rank]:
            while True:
                while queue and queue[0]["generation"] < generation:
                    queue.popleft()  # meant for the group before a restart
                if queue and queue[0]["generation"] == generation == self.generation:
                    return queue.popleft()
                await self.ready[rank].wait()  # empty, or this worker's group was replaced (it is being killed)

    async def put_result(self, cmd_id: int, rank: int, expected: int, result: Any) -> None:
        slot = self.results.setdefault(cmd_id, {})
        slot[rank] = result
        if len(slot) == expected:
            self._event(cmd_id).set()

    async def wait_results(self, cmd_id: int, timeout_s: float, generation: int) -> Any:
        """The results, None on timeout, or "restarted" when the group restarted after the command was sent."""
        try:
            await asyncio.wait_for(self._event(cmd_id).wait(), timeout_s)
        except asyncio.TimeoutError:
            return "restarted" if self.generation > generation else None
        self.events.pop(cmd_id, None)
        return self.results.pop(cmd_id)


_CommandChannel = ray.remote(num_cpus=0)(CommandChannel)  # an async actor: waits do not block each other
