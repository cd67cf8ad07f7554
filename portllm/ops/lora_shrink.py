"""lora_shrink: ``h[t] = x[t] · A[slots[t]]ᵀ``, the first half of serving many patches in one batch.

Math: the docstring of :func:`lora_shrink`. Reference: ``portllm.reference.lora_shrink``. Kernels:
``csrc/cpu/lora_shrink.cpp``, ``csrc/cuda/lora_shrink.cu``, ``kernels/lora_shrink.py`` (Triton). Used by
``portllm.serve.layer``. Tests: ``tests/test_serve_ops.py``. Benchmark: ``benchmarks/bench_serve.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from portllm import _ext, reference
from portllm.ops import registry
from portllm.ops.checks import FLOAT_DTYPES, check_slots


def lora_shrink(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, *, backend: str | None = None,
                tiles: torch.Tensor | None = None) -> torch.Tensor:
    """h[t] = x[t] · A[slots[t]]ᵀ, fp32 [T, R]; h[t] = 0 where slots[t] < 0.

    x [T, n] (float32/float16/bfloat16), A [P, R, n] (one patch's A per slot, ranks padded with
    zeros), slots [T] int64/int32 (values below P; negative = no patch). Products and accumulation in
    fp32 (bf16×bf16 and fp16×fp16 products are exact in fp32, so tensor-core dots keep this).
    The first half of a patched linear layer, ``portllm.serve.PatchedLinear``. ``tiles``: the
    grouping of ``slots`` from ``lora_tiles`` (computed once, shared by the layers of a forward).
    """
    if x.dim() != 2 or A.dim() != 3:
        raise ValueError(f"lora_shrink: need x [T, n] and A [P, R, n], got x {tuple(x.shape)}, A {tuple(A.shape)}")
    if A.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)} and A {tuple(A.shape)} disagree on n")
    for name, t in (("x", x), ("A", A)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"lora_shrink: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if A.device != x.device:
        raise ValueError(f"lora_shrink: A is on {A.device}, x on {x.device}")
    check_slots(slots, x.shape[0], x.device, "lora_shrink")
    name = registry.resolve_backend(backend, x.device, "lora_shrink")
    if x.shape[0] == 0 or A.shape[1] == 0:
        return torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    return registry.run("lora_shrink", name, x, A, slots.to(torch.int64), tiles)


@torch.library.custom_op("portllm::lora_shrink_triton", mutates_args=())
def _lora_shrink_triton(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor,
                        tiles: Optional[torch.Tensor] = None) -> torch.Tensor:
    from portllm.kernels.lora_shrink import lora_shrink_forward

    return lora_shrink_forward(x, A, slots, tiles)


@_lora_shrink_triton.register_fake
def _lora_shrink_triton_fake(x, A, slots, tiles=None):
    return x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32)


if _ext.has_kernel("lora_shrink", "CPU") or _ext.has_kernel("lora_shrink", "CUDA"):

    @torch.library.register_fake("portllm::lora_shrink")
    def _lora_shrink_fake(x, A, slots):
        return x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32)


registry.register("lora_shrink", *registry.standard_impls(
    "lora_shrink", source="lora_shrink", kernel="lora_shrink_forward",
    reference=lambda x, A, slots, tiles=None: reference.lora_shrink(x, A, slots),
    extension=lambda x, A, slots, tiles=None: torch.ops.portllm.lora_shrink(x, A, slots),
    triton=lambda x, A, slots, tiles=None: torch.ops.portllm.lora_shrink_triton(x, A, slots, tiles)))
