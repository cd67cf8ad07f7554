"""fp8_merge: a patch merged into a block-scaled FP8 weight, block by block: dequantize, add s·B·A,
recompute the block's scale as transformers' quantizer does, requantize (nearest even or stochastic),
and the sums that say how much of the update survived.

Math: ``portllm.fp8`` (module docstring) and :func:`fp8_merge`. Reference: ``portllm.reference.fp8_merge``
(PyTorch, band by band). Kernels: ``csrc/cpu/fp8_merge.cpp`` (one pass over the weight, block by block,
every output bit the reference's) and ``kernels/fp8_merge.py`` (Triton, one program per block, every
output bit the reference's; ``tests/test_fp8_triton.py``). Used by ``portllm.fp8.merge_`` (the port into FP8 checkpoints). Tests:
``tests/test_fp8.py``. Benchmark: ``benchmarks/bench_fp8.py``.
"""

from __future__ import annotations

import torch

from portllm import _ext, reference
from portllm.ops import registry
from portllm.ops.checks import FLOAT_DTYPES

E4M3 = torch.float8_e4m3fn


def fp8_merge(q: torch.Tensor, scale_inv: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor,
              block: tuple[int, int], *, stochastic: bool = False, key: int = 0,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', scale_inv', sums) for W' = dequantize(q, scale_inv) + B·diag(scale)·A, requantized per
    block; q, scale_inv are not modified.

    q: float8_e4m3fn [M, N]; scale_inv: float32 [ceil(M/bm), ceil(N/bn)] (its shape checked here for
    every backend, its values by the caller, ``fp8.check_block_scales``); B [M, r], A [r, N] (float32, float16 or bfloat16); scale float32 [r].
    W' is float32(float64(W) + Σ_k float64(float32(B[:,k]·scale[k]))·float64(A[k,:])), k ascending.
    ``stochastic``: rounding from 20 random bits per element, a hash of ``key`` (a 64-bit stream key,
    ``fp8.stream_key``) and the element's flat index, so deterministic per key and the same on every
    backend. ``sums``: float64 [3], ⟨Q−W, Δ⟩, ‖Δ‖², ‖Q−W−Δ‖² (``fp8.Retention``)."""
    if q.dtype != E4M3 or q.dim() != 2:
        raise TypeError(f"fp8_merge: q must be a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    M, N = q.shape
    r = B.shape[1] if B.dim() == 2 else -1
    if B.dim() != 2 or A.dim() != 2 or B.shape[0] != M or A.shape != (r, N):
        raise ValueError(f"fp8_merge: shapes do not match: q {tuple(q.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)} "
                         "(need B [M, r], A [r, N])")
    for name, t in (("B", B), ("A", A)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fp8_merge: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    bm, bn = (int(b) for b in block)
    if bm < 1 or bn < 1 or tuple(scale_inv.shape) != (-(-M // bm), -(-N // bn)):
        raise ValueError(f"fp8_merge: scale_inv has shape {tuple(scale_inv.shape)}; a {M}x{N} weight in blocks of "
                         f"{bm}x{bn} has [{-(-M // max(bm, 1))}, {-(-N // max(bn, 1))}]")
    Bs = (B.to(torch.float32) * scale.to(torch.float32)[None, :]).contiguous()
    name = registry.resolve_backend(backend, q.device, "fp8_merge")
    return registry.run("fp8_merge", name, q.contiguous(), scale_inv.to(torch.float32).contiguous(), Bs,
                        A.to(torch.float32).contiguous(), bm, bn, bool(stochastic), int(key))


def _cpp(q, s, Bs, A, bm, bn, stochastic, key):
    qo, so, st = torch.ops.portllm.fp8_merge(q.view(torch.uint8), s, Bs, A, bm, bn, stochastic, _signed64(key))
    return qo.view(E4M3), so, st


def _signed64(key: int) -> int:
    key &= (1 << 64) - 1
    return key - (1 << 64) if key >= 1 << 63 else key


if _ext.has_kernel("fp8_merge", "CPU"):

    @torch.library.register_fake("portllm::fp8_merge")
    def _fp8_merge_fake(q, s, Bs, A, bm, bn, stochastic, key):
        return torch.empty_like(q), torch.empty_like(s), s.new_empty(3, dtype=torch.float64)


@torch.library.custom_op("portllm::fp8_merge_triton", mutates_args=())
def _fp8_merge_triton(q: torch.Tensor, s: torch.Tensor, Bs: torch.Tensor, A: torch.Tensor, bm: int, bn: int,
                      stochastic: bool, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from portllm.kernels.fp8_merge import fp8_merge_forward

    return fp8_merge_forward(q, s, Bs, A, bm, bn, stochastic, key & ((1 << 64) - 1))


@_fp8_merge_triton.register_fake
def _fp8_merge_triton_fake(q, s, Bs, A, bm, bn, stochastic, key):
    return torch.empty_like(q), torch.empty_like(s), s.new_empty(3, dtype=torch.float64)


def _triton(q, s, Bs, A, bm, bn, stochastic, key):
    qo, so, st = torch.ops.portllm.fp8_merge_triton(q.view(torch.uint8), s, Bs, A, bm, bn, stochastic, _signed64(key))
    return qo.view(E4M3), so, st


registry.register("fp8_merge", *registry.standard_impls(
    "fp8_merge", source="fp8_merge", kernel="fp8_merge_forward", triton=_triton, extension_devices=("cpu",),
    reference=lambda q, s, Bs, A, bm, bn, stochastic, key: reference.fp8_merge(q, s, Bs, A, (bm, bn), stochastic, key),
    extension=_cpp))
