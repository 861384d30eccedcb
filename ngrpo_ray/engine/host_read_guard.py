"""A guard that catches every read of a tensor value into Python (a host synchronisation on an accelerator).

On a GPU, ``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``nonzero()``, boolean-mask indexing and friends make the host
wait for the device; a per-step path that does any of them cannot overlap with vLLM's async scheduling. On a CPU
nothing waits, so the property is checked instead: inside ``HostReadGuard`` every such call is recorded (or raised).
Pure PyTorch (a TorchFunctionMode); used by the hook's no-host-read test and available for debugging on a GPU.
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
_READS = {
    T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.__complex__, T.numpy, T.__array__,
    T.nonzero, torch.nonzero, T.argwhere, torch.argwhere, T.unique, torch.unique, T.unique_consecutive,
    torch.unique_consecutive, T.masked_select, torch.masked_select, torch.is_nonzero, T.__format__, T.__repr__,
}
_INDEXING = {T.__getitem__, T.__setitem__, T.index_put, T.index_put_, torch.index_put, torch.index_put_}


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _device_of(value) -> torch.device | None:
    if isinstance(value, (str, torch.device)):
        try:
            return torch.device(value)
        except (RuntimeError, TypeError):
            return None
    return None


def _violation(func, args, kwargs) -> str | None:
    kwargs = kwargs or {}
    if func in _READS:
        return getattr(func, "__name__", str(func))
    if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
        # from Python data straight to a device: a blocking copy that waits for the device's queued work on CUDA
        # (flagged on every device, so a CPU run proves its absence); hook_batch.to_device copies asynchronously
        return f"{func.__name__}(..., device=...) (a blocking host-to-device copy)"
    if func is T.to and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu" \
            and not kwargs.get("non_blocking", False):
        target = next((d for d in map(_device_of, list(args[1:]) + [kwargs.get("device")]) if d is not None), None)
        if target is not None and target.type != "cpu":
            return "a blocking host-to-device copy (.to without non_blocking)"
    if func in _INDEXING and len(args) > 1 and _has_bool_index(args[1]):
        return f"{func.__name__} with a boolean mask (its result size is read from the device)"
    if func is torch.where and len(args) == 1 and not kwargs:
        return "torch.where(cond) (a nonzero)"
    if func in (T.repeat_interleave, torch.repeat_interleave) and "output_size" not in (kwargs or {}) \
            and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return "repeat_interleave without output_size"
    if func in (T.cpu,) or (func is T.to and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu") for a in args[1:])):
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and source.device.type != "cpu":
            return "copy to the host"
    return None


class HostReadGuard(TorchFunctionMode):
    """``with HostReadGuard() as g: ...``; ``g.violations`` lists (name, stack) of every tensor read into Python.
    ``raise_on_read=True`` raises at the first one instead."""

    def __init__(self, raise_on_read: bool = False):
        super().__init__()
        self.raise_on_read = raise_on_read
        self.violations: list[tuple[str, str]] = []
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        what = _violation(func, args, kwargs)
        if what is not None:
            stack = "".join(traceback.format_stack(limit=8)[:-1])
            self.violations.append((what, stack))
            if self.raise_on_read:
                raise RuntimeError(f"host read of a tensor value inside a guarded path: {what}\n{stack}")
        return func(*args, **(kwargs or {}))
