"""torch.autocast and lmfast's ops: each op is autocast as the torch op it stands in for.

Under torch.autocast, torch casts the inputs of the ops on its lists (aten/src/ATen/autocast_mode.cpp):
scaled_dot_product_attention runs in the autocast dtype ("lower precision", CPU and CUDA alike);
layer_norm, rms_norm and softmax run in float32 where they are listed (CUDA) and as they come
where they are not (CPU). Only floating tensors other than float64 are cast. A custom op has no
autocast kernel unless one registers it, so lmfast.ops.attention would get a float32 q (Llama's
rotary embedding promotes it) beside a bfloat16 v and refuse it, where SDPA casts both. So the
ops apply the same rule here, in Python, before choosing a backend: one cheap call
(`any_enabled`, ~0.1 us) when autocast is off, the usual case.

Which device types torch autocasts each op on is read from torch's dispatcher at import, so the
rule follows the torch that runs (tests/test_autocast.py checks it against torch's own ops).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

any_enabled = torch._C._is_any_autocast_enabled  # False: nothing here applies (one C call)

# torch's autocast dispatch key per device type lmfast runs on
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "xpu": "AutocastXPU", "mps": "AutocastMPS"}


def _autocast_devices(aten_op: str, known: tuple[str, ...]) -> frozenset[str]:
    """The device types whose autocast has a kernel for aten_op; `known`, torch 2.13's answer,
    where the dispatcher cannot be asked (a private API: importing lmfast must not fail on it)."""
    found = set()
    for device, key in _AUTOCAST_KEYS.items():
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, key):
                found.add(device)
        except (AttributeError, RuntimeError):  # no such function, or no such key in this torch
            if device in known:
                found.add(device)
    return frozenset(found)


# lmfast op -> device types where torch autocasts its torch counterpart
LOWER_PRECISION = {"attention": _autocast_devices("aten::scaled_dot_product_attention", ("cpu", "cuda", "xpu"))}
FLOAT32 = {
    "layer_norm": _autocast_devices("aten::layer_norm", ("cuda", "xpu")),
    "rms_norm": _autocast_devices("aten::rms_norm", ("cuda", "xpu")),
    "softmax": _autocast_devices("aten::softmax.int", ("cuda", "xpu")),
}


def _eligible(t: object) -> bool:
    """What autocast casts: a floating tensor other than float64 (anything else passes as it is,
    for the op's checks to name)."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64


def lower_precision_dtype(op: str, x: object) -> torch.dtype | None:
    """The autocast dtype that torch's counterpart of `op` would run x in now, else None."""
    if not _eligible(x):
        return None
    device = x.device.type
    if device in LOWER_PRECISION[op] and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def runs_in_float32(op: str, x: object) -> bool:
    """Whether torch's counterpart of `op` would run x in float32 now (CUDA autocast)."""
    if not _eligible(x):
        return False
    device = x.device.type
    return device in FLOAT32[op] and torch.is_autocast_enabled(device)


def cast(dtype: torch.dtype, *tensors):
    """The tensors as autocast casts them to dtype: floating ones other than float64; anything
    else (None, integer or boolean masks, float64) unchanged."""
    return tuple(t.to(dtype) if _eligible(t) else t for t in tensors)


def float32(t):
    """t cast as autocast's float32 rule casts it."""
    return t.float() if _eligible(t) else t


def off(x: Tensor):
    """A context in which torch ops on x's device are not autocast (for the reference
    backend, which computes with torch ops in the dtypes it chooses)."""
    return torch.autocast(x.device.type, enabled=False) if any_enabled() else contextlib.nullcontext()
