"""Triton skeleton GEMMs: products with rows or columns of W gathered by index, never copied.

Implements the op ``portllm.ops.skeleton_mm`` (backend ``triton``, registered as
``torch.ops.portllm.skeleton_mm_triton``); tested against the reference by ``tests/test_pmss_ops.py``.

All three products of PMSS (see ``portllm.reference.skeleton_mm``) are one kernel,
``OUT[T, N] = A[T, K] @ B`` with ``B[k, c] = W[ROFF[k] + COFF[c]]``: the gather is folded into the
offsets (element offsets into W, int64). Sorted indices keep each tile's gathered elements close.
Only one side is gathered in each product; the other is an arange times W's stride, computed in the
kernel (``ROW_GATHER`` / ``COL_GATHER``), so that where that stride is 1 the compiler sees the
contiguity and loads the tile in 16-byte vectors (``portllm.inspection``: kind ``r`` of a row-major W);
``ALIGNED`` says the gathered offsets are multiples of 8 elements (the launcher checks the stride).
fp32 accumulation; on a GPU the dot runs on W's dtype (tensor cores), in the interpreter in fp32
(its bf16 dot is wrong).
"""

import os

import torch
import triton
import triton.language as tl

from portllm.kernels.rounding import to_bf16_rne


@triton.jit
def _skeleton_mm_kernel(
    A,  # [T, K]
    W,  # gathered through ROFF/COFF
    ROFF,  # [K] int64 (ROW_GATHER), else unused
    COFF,  # [N] int64 (COL_GATHER), else unused
    OUT,  # [T, N]
    T,
    K,
    N,
    stride_at,
    stride_ak,
    stride_ot,
    stride_on,
    stride_r,  # element stride of B's rows in W where they are not gathered
    stride_c,  # element stride of B's columns in W where they are not gathered
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
    ROW_GATHER: tl.constexpr,
    COL_GATHER: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < N
    if COL_GATHER:
        coff = tl.load(COFF + offs_n, mask=mask_n, other=0)
        if ALIGNED:
            coff = tl.multiple_of(coff, 8)
    else:
        coff = offs_n * stride_c
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        if ROW_GATHER:
            roff = tl.load(ROFF + offs_k, mask=mask_k, other=0)
            if ALIGNED:
                roff = tl.multiple_of(roff, 8)
        else:
            roff = offs_k * stride_r
        a = tl.load(A + offs_t[:, None] * stride_at + offs_k[None, :] * stride_ak,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(W + roff[:, None] + coff[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(b.dtype), b, acc)
    out_ptrs = OUT + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_t[:, None] & mask_n[None, :]
    if OUT.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptrs, to_bf16_rne(acc), mask=mask)
    else:
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def offsets(W: torch.Tensor, idx: torch.Tensor, kind: str):
    """(ROFF [K], COFF [N]) element offsets into W for each kind of product."""
    s0, s1 = W.stride()
    m, n = W.shape
    ar = lambda size: torch.arange(size, device=W.device, dtype=torch.int64)  # noqa: E731
    if kind == "ct":
        return idx * s1, ar(m) * s0
    if kind == "c":
        return ar(m) * s0, idx * s1
    if kind == "r":
        return idx * s0, ar(n) * s1
    raise ValueError(f"skeleton_mm: unknown kind {kind!r}")


LAUNCH = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=32)  # (also what ``portllm.inspection`` compiles)


def skeleton_mm_forward(A: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    roff, coff = offsets(W, idx.to(torch.int64), kind)
    s0, s1 = W.stride()
    # which side is gathered; the other's stride (offsets() gives both, the kernel computes the arange)
    gather = {"ct": (True, False, 0, s0), "c": (False, True, s0, 0), "r": (True, False, 0, s1)}[kind]
    gathered_stride = s1 if kind in ("ct", "c") else s0
    aligned = gathered_stride % 8 == 0 and W.data_ptr() % 16 == 0
    T, K = A.shape
    N = coff.numel()
    out = torch.empty(T, N, device=A.device, dtype=A.dtype)
    if T == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    grid = (triton.cdiv(T, LAUNCH["BLOCK_T"]), triton.cdiv(N, LAUNCH["BLOCK_N"]))
    _skeleton_mm_kernel[grid](
        A, W, roff, coff, out, T, K, N, A.stride(0), A.stride(1), out.stride(0), out.stride(1), gather[2], gather[3],
        **LAUNCH,
        DOT_FP32=os.environ.get("TRITON_INTERPRET") == "1" or A.dtype == torch.float32,
        ROW_GATHER=gather[0], COL_GATHER=gather[1], ALIGNED=aligned,
    )
    return out
