"""How many prompts one engine call may take so that its mixed steps fit the engine's ring table.

Every mixed step takes a ring slot (its candidates and weights, addressed by a virtual id) until the call ends and
its records are read; more mixed steps than slots in one call overwrite records that are still needed, and the hook
refuses the call after it ran. A response has at most ``max_tokens`` steps and each mixes with probability ``rho``
(rho 1 for the baselines that perturb every step), so a prompt's group needs about ``group_size x max_tokens x rho``
slots when every response runs to the cap. At the paper's evaluation (math500: 500 prompts x 32 samples, 8,192
tokens, rho 0.1, 8 engines) one call per engine would ask for 1.7M slots of the default 1,048,576; the fleet splits
such a call into enough chunks instead.
"""

from __future__ import annotations

import math

# Above the expected count when every response reaches the cap: the gate's Bernoulli draws spread the count by about
# sqrt(n rho) (0.1% at a million), so 5% is ample; shorter responses only add room.
MARGIN = 1.05


def slots_per_prompt(group_size: int, max_tokens: int, rho: float) -> float:
    """Ring slots one prompt's group can need in one call (with the margin)."""
    return group_size * max_tokens * max(0.0, float(rho)) * MARGIN


def prompts_per_call(group_size: int, max_tokens: int, rho: float, slots: int) -> int | None:
    """The most prompts one engine call can take without overflowing ``slots``; None when mixing is off (no
    limit); 0 when a single prompt's group does not fit (the config refuses that: mixing.table_slots)."""
    need = slots_per_prompt(group_size, max_tokens, rho)
    if need <= 0:
        return None
    return int(slots // need)


def calls_needed(num_prompts: int, group_size: int, max_tokens: int, rho: float, slots: int) -> int:
    """The fewest engine calls (chunks) over which ``num_prompts`` prompts fit the ring."""
    per_call = prompts_per_call(group_size, max_tokens, rho, slots)
    if per_call is None or num_prompts == 0:
        return 1
    if per_call == 0:
        raise ValueError(f"one prompt's group ({group_size} responses x {max_tokens} tokens x rho {rho}) needs "
                         f"{slots_per_prompt(group_size, max_tokens, rho):,.0f} ring slots, the engine has {slots:,} "
                         f"(mixing.table_slots)")
    return math.ceil(num_prompts / per_call)
