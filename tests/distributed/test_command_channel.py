"""The trainer's command channel across a worker-group restart (generations), driven directly with asyncio."""

import asyncio

import pytest

from ngrpo_ray.distributed.command_channel import CommandChannel


def _cmd(cmd_id: int, generation: int) -> dict:
    return {"id": cmd_id, "op": "train", "kwargs": {}, "ranks": [0, 1], "generation": generation}


def test_a_restart_drops_stale_commands_and_refuses_old_ones():
    async def scenario():
        ch = CommandChannel(world_size=2)
        assert [await ch.register(0), await ch.register(1)] == [0, 0]
        assert await ch.put([0, 1], _cmd(1, 0))
        assert (await ch.next_command(0, 0))["id"] == 1  # rank 0 took it, then its process died
        # Ray Train restarts the group: the first new worker raises the generation at once
        assert await ch.register(0) == 1 and await ch.get_generation() == 1
        assert await ch.wait_results(1, 0.01, generation=0) == "restarted"  # the driver's pending wait learns it
        assert not await ch.put([0, 1], _cmd(2, 0))  # a command for the old group is refused ...
        assert await ch.put([0, 1], _cmd(3, 1))  # ... one for the new group queued for rank 1 before it registers
        old_rank1 = asyncio.create_task(ch.next_command(1, 0))  # the old rank 1, still alive, never takes it
        await asyncio.sleep(0.01)
        assert not old_rank1.done()  # its group was replaced: it takes nothing more (it is killed with the group)
        old_rank1.cancel()
        assert await ch.register(1) == 1
        got = await asyncio.wait_for(ch.next_command(1, 1), 1.0)
        assert got["id"] == 3  # the new rank 1 gets the new command: nothing from before the restart
        assert (await ch.next_command(0, 1))["id"] == 3
        for rank in (0, 1):
            await ch.put_result(3, rank, 2, {"ok": True, "value": rank})
        assert await ch.wait_results(3, 1.0, generation=1) == {0: {"ok": True, "value": 0}, 1: {"ok": True, "value": 1}}

    asyncio.run(scenario())


def test_without_a_restart_a_slow_command_is_only_a_timeout():
    async def scenario():
        ch = CommandChannel(world_size=1)
        await ch.register(0)
        assert await ch.put([0], _cmd(1, 0))
        assert await ch.wait_results(1, 0.01, generation=0) is None

    asyncio.run(scenario())
