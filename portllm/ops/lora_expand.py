"""lora_expand_: ``y[t] += scale[p] · h[t] · B[p]ᵀ`` in place, ``p = slots[t]``: the second half of serving.

Math: the docstring of :func:`lora_expand_`. Reference: ``portllm.reference.lora_expand_``. Kernels:
``csrc/cpu/lora_expand.cpp``, ``csrc/cuda/lora_expand.cu``, ``kernels/lora_expand.py`` (Triton). Used by
``portllm.serve.layer``. Tests: ``tests/test_serve_ops.py``. Benchmark: ``benchmarks/bench_serve.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from portllm import _ext, reference
from portllm.ops import registry
from portllm.ops.checks import FLOAT_DTYPES, check_slots, overlaps_itself


def lora_expand_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor, *,
                 backend: str | None = None, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] ← round(fp32(y[t]) + scale[p] · (h[t] · B[p]ᵀ)), p = slots[t], in place; returns y.

    y [T, m] (float32/float16/bfloat16), h [T, R] fp32 (from ``lora_shrink``), B [P, m, R],
    scale [P] fp32, slots [T]. fp32 accumulation and one rounding (to nearest even) per element; rows
    with slots[t] < 0 are left untouched, bit for bit. The second half of a patched linear layer.
    """
    if y.dim() != 2 or h.dim() != 2 or B.dim() != 3:
        raise ValueError(f"lora_expand_: need y [T, m], h [T, R], B [P, m, R], got y {tuple(y.shape)}, "
                         f"h {tuple(h.shape)}, B {tuple(B.shape)}")
    T, m = y.shape
    P, mb, R = B.shape
    if h.shape != (T, R) or mb != m:
        raise ValueError(f"lora_expand_: shapes do not match: y {tuple(y.shape)}, h {tuple(h.shape)}, "
                         f"B {tuple(B.shape)}")
    if h.dtype != torch.float32:
        raise TypeError(f"lora_expand_: h must be float32 (lora_shrink's output), got {h.dtype}")
    for name, t in (("y", y), ("B", B)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"lora_expand_: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if scale.shape != (P,) or scale.dtype != torch.float32:
        raise ValueError(f"lora_expand_: scale must be float32 [{P}], got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("h", h), ("B", B), ("scale", scale)):
        if t.device != y.device:
            raise ValueError(f"lora_expand_: {name} is on {t.device}, y on {y.device}")
    check_slots(slots, T, y.device, "lora_expand_")
    name = registry.resolve_backend(backend, y.device, "lora_expand_")
    if T == 0 or m == 0 or R == 0:
        return y
    if overlaps_itself(y):
        raise ValueError(f"lora_expand_: y (shape {tuple(y.shape)}, stride {y.stride()}) has elements that share "
                         "memory; an in-place update would be wrong")
    registry.run("lora_expand_", name, y, h, B, scale, slots.to(torch.int64), tiles)
    return y


def _triton(y, h, B, scale, slots, tiles=None):
    torch.ops.portllm.lora_expand_triton_(y, h, B, scale, slots, tiles)


@torch.library.custom_op("portllm::lora_expand_triton_", mutates_args=("y",))
def _lora_expand_triton(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                        slots: torch.Tensor, tiles: Optional[torch.Tensor] = None) -> None:
    from portllm.kernels.lora_expand import lora_expand_forward

    lora_expand_forward(y, h, B, scale, slots, tiles)


@_lora_expand_triton.register_fake
def _lora_expand_triton_fake(y, h, B, scale, slots, tiles=None) -> None:
    return None


if _ext.has_kernel("lora_expand_", "CPU") or _ext.has_kernel("lora_expand_", "CUDA"):

    @torch.library.register_fake("portllm::lora_expand_")
    def _lora_expand_fake(y, h, B, scale, slots) -> None:
        return None


registry.register("lora_expand_", *registry.standard_impls(
    "lora_expand_", source="lora_expand", kernel="lora_expand_forward",
    reference=lambda y, h, B, scale, slots, tiles=None: reference.lora_expand_(y, h, B, scale, slots),
    extension=lambda y, h, B, scale, slots, tiles=None: torch.ops.portllm.lora_expand_(y, h, B, scale, slots),
    triton=_triton))
