"""Input validation shared by the ops: every error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def floating_tensor(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")


def same_device_and_dtype(name: str, t: Tensor, x: Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}; both must be on one device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {x_name} has dtype {x.dtype}; they must match "
                        f"(cast with {name}.to({x_name}.dtype))")


def norm_param(name: str, t: Tensor | None, x: Tensor) -> None:
    """weight / bias of a norm over x's last dim: None, or a (N,) tensor like x."""
    if t is None:
        return
    floating_tensor(name, t)
    same_device_and_dtype(name, t, x)
    if tuple(t.shape) != (x.shape[-1],):
        raise ValueError(f"{name} must have shape ({x.shape[-1]},), the last dim of x "
                         f"{tuple(x.shape)}, got {tuple(t.shape)}")


def residual_like(t: Tensor | None, x: Tensor) -> None:
    if t is None:
        return
    floating_tensor("residual", t)
    same_device_and_dtype("residual", t, x)
    if t.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def real_number(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return float(value)


def weight_offset(value: object, weight: Tensor | None) -> float:
    """RMSNorm's weight_offset (the scale is weight_offset + weight): finite, and 0 without a weight."""
    value = real_number("weight_offset", value)
    if value != 0 and weight is None:
        raise ValueError(f"weight_offset={value} needs a weight (without one the scale is 1)")
    return value


def dropout(p: object, seed: object) -> float:
    """Attention dropout: p a probability in [0, 1); seed None or an int64 tensor of one element."""
    p = real_number("dropout_p", p)
    if not 0 <= p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    if seed is not None:
        if not isinstance(seed, Tensor):
            raise TypeError(f"dropout_seed must be a torch.Tensor or None, got {type(seed).__name__}")
        if seed.dtype != torch.int64:
            raise TypeError(f"dropout_seed must be an int64 tensor, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"dropout_seed must have one element, got shape {tuple(seed.shape)}")
    return p


def softcap(value: object) -> float:
    """Attention's logit cap: a positive finite number (scores become softcap * tanh(s / softcap))."""
    value = real_number("softcap", value)
    if not value > 0:
        raise ValueError(f"softcap must be positive (scores become softcap * tanh(s / softcap)), got {value}")
    return value


def sinks(t: object, q: Tensor) -> None:
    """Attention sinks: one floating logit per query head, on q's device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sinks must be a floating tensor, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"sinks is on {t.device} but q is on {q.device}")
    if tuple(t.shape) != (q.shape[1],):
        raise ValueError(f"sinks must have shape (Hq,) = ({q.shape[1]},), one per query head, got {tuple(t.shape)}")


def dim_index(dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for x with {ndim} dims")
    return int(dim) % ndim


def documents(cu_seqlens_q: object, cu_seqlens_k: object, q: Tensor) -> bool:
    """Packed documents (csrc/documents.h): both or neither, each an int32/int64 (n + 1,) tensor on
    q's device, q a batch of one; returns whether given. (Their values are the kernels' check.)"""
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return False
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("cu_seqlens_q and cu_seqlens_k go together: pass both or neither")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
        if t.dim() != 1 or t.numel() < 1:
            raise ValueError(f"{name} must have shape (n + 1,) for n documents, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; both must be on one device")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (n + 1 for n documents), got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens_q packs documents into one sequence: q must have batch size 1, got {q.shape[0]}")
    return True


def document_values(cu_q: Tensor, cu_k: Tensor, Sq: int, Sk: int) -> None:
    """The values of packed documents' cu_seqlens (documents), as csrc/documents.h's
    check_boundaries: both start at 0, never decrease, and end at Sq and Sk. Read on the host for
    CPU tensors; on a GPU (and while torch.compile traces) an asynchronous assert, so that no call
    waits on the device. (The kernel backends on a GPU check them in the kernel that builds their
    table instead: lmfast/kernels/attention.py's _document_bands, csrc/cuda/attention.cu's.)"""
    for name, c, end, what in (("cu_seqlens_q", cu_q, Sq, "Sq"), ("cu_seqlens_k", cu_k, Sk, "Sk")):
        if c.device.type == "cpu" and not torch.compiler.is_compiling():
            x = c.tolist()
            if x[0] != 0:
                raise ValueError(f"{name} must start at 0, got {x[0]}")
            for d in range(1, len(x)):
                if x[d] < x[d - 1]:
                    raise ValueError(f"{name} must not decrease, got {x[d - 1]} then {x[d]} at index {d}")
            if x[-1] != end:
                raise ValueError(f"{name} must end at {what} = {end} (every row in a document), got {x[-1]}")
        else:
            ok = (c[0] == 0) & (c[-1] == end) & (c[1:] >= c[:-1]).all()
            torch._assert_async(ok, f"{name} must start at 0, not decrease, and end at the "
                                    f"{'query' if name == 'cu_seqlens_q' else 'key'} count")


def mask_for(mask: Tensor | None, x: Tensor, shape: tuple[int, ...] | None = None,
             name: str = "mask", shape_name: str = "x's shape") -> None:
    """An additive (x's dtype) or boolean (True = keep) mask broadcastable to `shape` (default
    x's shape), described in errors as `shape_name`."""
    if mask is None:
        return
    target = tuple(x.shape) if shape is None else tuple(shape)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but x is on {x.device}")
    if mask.dtype != torch.bool:
        if mask.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be boolean (True = keep) or additive float, got {mask.dtype}")
        if mask.dtype != x.dtype:
            raise TypeError(f"additive {name} has dtype {mask.dtype} but x has {x.dtype}; pass "
                            f"{name}.to(x.dtype) or a boolean mask")
    # broadcasts to target, checked by hand: torch.broadcast_shapes costs ~75 us a call
    ok = mask.dim() <= len(target) and all(m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target)))
    if not ok:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {shape_name} {target}")
