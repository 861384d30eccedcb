"""The guard of the no-host-read test catches each way a tensor value can reach Python (positive controls), and lets
the static-shape ops of the hook's per-step path through. No engine: runs in well under a second."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.engine.host_read_guard import HostReadGuard

READS = {
    "item": lambda t, m: t.sum().item(),
    "tolist": lambda t, m: t.tolist(),
    "bool": lambda t, m: bool(t.sum() > 0),
    "if": lambda t, m: 1 if (t > 0).any() else 0,
    "int": lambda t, m: int(t[0]),
    "float": lambda t, m: float(t[0]),
    "index": lambda t, m: [1, 2, 3][t[0].long()],
    "nonzero": lambda t, m: m.nonzero(),
    "where1": lambda t, m: torch.where(m),
    "mask_get": lambda t, m: t[m],
    "mask_set": lambda t, m: t.__setitem__(m, 0.0),
    "unique": lambda t, m: t.unique(),
    "masked_select": lambda t, m: t.masked_select(m),
    "numpy": lambda t, m: t.numpy(),
    "format": lambda t, m: f"{t[0]:.3f}",
    "tensor_to_device": lambda t, m: torch.tensor(float("-inf"), device=t.device),
    "as_tensor_to_device": lambda t, m: torch.as_tensor([1, 2], device=t.device),
}


@pytest.mark.parametrize("name", sorted(READS))
def test_guard_catches_each_host_read(name):
    t = torch.arange(6, dtype=torch.float32) - 2.0
    m = t > 0
    with HostReadGuard() as guard:
        READS[name](t, m)
    assert len(guard.violations) >= 1, name
    with pytest.raises(RuntimeError, match="host read"):
        with HostReadGuard(raise_on_read=True):
            READS[name](t, m)


def test_guard_lets_static_shape_ops_through():
    logits = torch.randn(4, 50)
    rows = torch.tensor([0, 2])
    with HostReadGuard(raise_on_read=True) as guard:
        z = logits.index_select(0, rows) / 0.7
        anchor = z.argmax(-1)
        mask = torch.zeros(3, 51, dtype=torch.bool)
        banned = mask[torch.tensor([1, 2]), anchor]
        out = torch.where(~banned, anchor, -1)
        counts = torch.cumsum(out.ge(0).long(), 0)
        logits[rows, 0] = out.float() + counts
        torch.softmax(z, -1).gather(1, anchor.unsqueeze(1))
        torch.where(banned, z[:, 0], float("-inf"))  # a Python scalar instead of torch.tensor(-inf, device=...)
        torch.tensor([1, 2]).to("cpu", non_blocking=True)
    assert guard.violations == [] and guard.calls > 5
