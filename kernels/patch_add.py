"""Triton patch_add_: W[m, n] += B[m, r] · diag(scale[r]) · A[r, n], in place.

Implements the op ``portllm.ops.patch_add_`` (backend ``triton``, registered as
``torch.ops.portllm.patch_add_triton_``); tested against the reference by ``tests/test_patch_add.py``.

One program owns a BLOCK_M × BLOCK_N tile of W: it accumulates (B·scale)[tile rows, :] @ A[:, tile
cols] in fp32, BLOCK_R ranks at a time, then reads the W tile once, adds, rounds once and writes
it once. Factors are read in their own dtype and converted in registers, so no fp32 copies exist.
"""

import torch
import triton
import triton.language as tl

from portllm.kernels.rounding import to_bf16_rne


@triton.jit
def _patch_add_kernel(
    W,  # [M, N] bf16/fp16/fp32, strides (stride_wm, stride_wn)
    B,  # [M, R]
    A,  # [R, N]
    S,  # [R] fp32
    M,
    N,
    R,
    stride_wm,
    stride_wn,
    stride_bm,
    stride_bk,
    stride_ak,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        offs_k = k0 + tl.arange(0, BLOCK_R)
        mask_k = offs_k < R
        b = tl.load(B + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        s = tl.load(S + offs_k, mask=mask_k, other=0.0)
        a = tl.load(A + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(b * s[None, :], a, acc, input_precision=INPUT_PRECISION)

    w_ptrs = W + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    mask = mask_m[:, None] & mask_n[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    out = w + acc
    if W.dtype.element_ty == tl.bfloat16:
        tl.store(w_ptrs, to_bf16_rne(out), mask=mask)
    else:
        tl.store(w_ptrs, out.to(W.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def patch_add_forward(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    """Host launcher. Arguments are checked by ``portllm.ops``; scale is fp32 [r] on W's device."""
    M, N = W.shape
    R = B.shape[1]
    if W.numel() == 0 or R == 0:
        return
    # tl.dot needs every dimension >= 16; ranks are masked up to BLOCK_R.
    BLOCK_R = min(64, max(16, triton.next_power_of_2(R)))
    BLOCK_M, BLOCK_N = 64, 128
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _patch_add_kernel[grid](
        W, B, A, scale, M, N, R,
        W.stride(0), W.stride(1), B.stride(0), B.stride(1), A.stride(0), A.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        # fp32 products, not TF32: the op promises fp32 accumulation of fp32 products.
        INPUT_PRECISION="ieee",
        num_warps=8 if BLOCK_R >= 64 else 4,
    )
