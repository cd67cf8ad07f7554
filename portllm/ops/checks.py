"""Argument checks shared by several ops (each op's own checks live in its file)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def overlaps_itself(W: torch.Tensor) -> bool:
    """Whether two indices of W (any number of dimensions) address one element (expand, as_strided)."""
    if W.numel() <= 1:
        return False
    dims = sorted((abs(st), sz) for st, sz in zip(W.stride(), W.shape) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    # Non-overlapping iff each stride is at least the span of the smaller dimensions.
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * (sz - 1) + span
    return False


def check_slots(slots, T: int, device, op: str):
    """The serving ops' per-token patch slots: 1-D int64/int32, one per token, on the tokens' device."""
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: slots must be a 1-D int64/int32 tensor, got "
                        f"{getattr(slots, 'dtype', type(slots).__name__)} {tuple(getattr(slots, 'shape', ()))}")
    if slots.shape[0] != T:
        raise ValueError(f"{op}: slots has {slots.shape[0]} entries for {T} tokens")
    if slots.device != device:
        raise ValueError(f"{op}: slots is on {slots.device}, the tokens on {device}")
