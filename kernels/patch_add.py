"""Triton patch_add_: W[m, n] += B[m, r] · diag(scale[r]) · A[r, n], in place; and the batched
W[e] += B[e] · diag(scale[e]) · A[e] for every expert e of a fused [E, m, n] weight, in one launch.

Implements the ops ``portllm.ops.patch_add_`` and ``patch_add_experts_`` (backend ``triton``, registered
as ``torch.ops.portllm.patch_add_triton_`` and ``patch_add_experts_triton_``); tested against the
reference by ``tests/test_patch_add.py`` and ``tests/test_patch_add_experts.py``.

The design that reached the copy bandwidth on an H100 (../shared/gpu/h100-2026-11-22.md): one
program per 64×128 tile of W, programs ordered in groups of GROUP_M tile-rows so that neighbours
share factor tiles in L2, the rank in as few ``tl.dot`` calls as possible, then W read once, added
in fp32, rounded once (the hardware's round-to-nearest-even) and written once. Three ways to form
the product, by dtype (``MODE``):

* ``MODE_HALF`` (bf16 W or fp16 W, both factors bf16 or both fp16): the factors go to the tensor
  cores as they are; bf16×bf16 and fp16×fp16 products are exact in fp32 and accumulate in fp32.
  Ranks that share a scale form a group (one per concatenated patch); each group's sum is scaled
  once: ``W + Σ_g s_g·(Σ_{k∈g} B[i,k]·A[k,j])``.
* ``MODE_SPLIT`` (16-bit W, fp32 factors, as PEFT saves them): ``Bs = B·s`` and ``A`` are split once
  per merge into bf16 high and low parts, and ``Bh·Ah + Bh·Al + Bl·Ah`` runs on the tensor cores with
  fp32 accumulation (the dropped ``Bl·Al`` is 2⁻¹⁶ of a product: far below a 16-bit W's ulp).
* ``MODE_FP32`` (fp32 W, or mixed factor dtypes): ``fp32(B·s)·A`` in full fp32 (``ieee``), the
  reference's numerics exactly: an fp32 W keeps its fp32-exact path.

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 dots are wrong in the interpreter, so 16-bit operands
are widened to fp32 first (their products are exact either way), and bf16 rounding is done in
integer arithmetic (the interpreter truncates in ``.to``).
"""

import os

import torch
import triton
import triton.language as tl

from portllm.kernels.rounding import to_bf16_rne

MODE_FP32, MODE_HALF, MODE_SPLIT = 0, 1, 2


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _patch_add_kernel(
    W,  # [M, N] bf16/fp16/fp32, strides (stride_wm, stride_wn)
    B,  # [M, R]: B (MODE_HALF, MODE_FP32) or Bh = bf16(B·s) (MODE_SPLIT)
    A,  # [R, N]: A, or Ah = bf16(A)
    BL,  # [M, R] bf16 low part of B·s (MODE_SPLIT only; else B)
    AL,  # [R, N] bf16 low part of A (MODE_SPLIT only; else A)
    S,  # [R] fp32 per-rank scales (MODE_FP32); per expert, at stride_se
    GK,  # [NG + 1] int32: rank groups [GK[g], GK[g+1]) of equal scale (MODE_HALF), shared by the experts
    GS,  # [NG] fp32: each group's scale (MODE_HALF); per expert, at stride_ge
    M,
    N,
    R,
    NG,
    stride_wm,
    stride_wn,
    stride_bm,
    stride_bk,
    stride_ak,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    SOFT_RNE: tl.constexpr,
    stride_we=0,  # expert strides (program_id(1) is the expert; 0 for a single W)
    stride_be=0,
    stride_ae=0,
    stride_se=0,
    stride_ge=0,
):
    # Expert e of a batched merge (W[e] += B[e]·diag(s_e)·A[e]): its own base pointers.
    pid_e = tl.program_id(1).to(tl.int64)
    W += pid_e * stride_we
    B += pid_e * stride_be
    A += pid_e * stride_ae
    BL += pid_e * stride_be
    AL += pid_e * stride_ae
    S += pid_e * stride_se
    GS += pid_e * stride_ge
    # Grouped program order: GROUP_M tile-rows at a time, so consecutive programs reuse A's tiles.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % per_group) % group_m).to(tl.int64)
    pid_n = ((pid % per_group) // group_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 1:  # MODE_HALF: one fp32 sum per group of equal-scale ranks, scaled once
        for g in range(0, NG):
            k_lo = tl.load(GK + g)
            k_hi = tl.load(GK + g + 1)
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # Chunks aligned to BLOCK_R (B is zero-padded to a multiple of it by the launcher), so B's
            # tile loads whole rows of 16-byte vectors; the group's ranks are chosen by masking A's
            # rows, a mask constant along each row, which keeps A's loads vectorized too.
            for k0 in range((k_lo // BLOCK_R) * BLOCK_R, k_hi, BLOCK_R):
                k0 = tl.multiple_of(k0, BLOCK_R)
                offs_k = k0 + tl.arange(0, BLOCK_R)
                in_group = (offs_k >= k_lo) & (offs_k < k_hi)
                b = tl.load(B + offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                            mask=mask_m[:, None], other=0.0)
                a = tl.load(A + offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an,
                            mask=in_group[:, None] & mask_n[None, :], other=0.0)
                part = _dot(b, a, part, UPCAST)
            acc += part * tl.load(GS + g)
    else:
        for k0 in range(0, R, BLOCK_R):
            offs_k = k0 + tl.arange(0, BLOCK_R)
            mask_k = offs_k < R
            b_ptrs = offs_m[:, None] * stride_bm + offs_k[None, :] * stride_bk
            a_ptrs = offs_k[:, None] * stride_ak + offs_n[None, :] * stride_an
            mask_b = mask_m[:, None] & mask_k[None, :]
            mask_a = mask_k[:, None] & mask_n[None, :]
            if MODE == 2:  # MODE_SPLIT: Bh·Ah + Bh·Al + Bl·Ah, all bf16 on the tensor cores
                bh = tl.load(B + b_ptrs, mask=mask_b, other=0.0)
                ah = tl.load(A + a_ptrs, mask=mask_a, other=0.0)
                acc = _dot(bh, tl.load(AL + a_ptrs, mask=mask_a, other=0.0), acc, UPCAST)
                acc = _dot(tl.load(BL + b_ptrs, mask=mask_b, other=0.0), ah, acc, UPCAST)
                acc = _dot(bh, ah, acc, UPCAST)
            else:  # MODE_FP32: fp32(B·s) · A in full fp32
                s = tl.load(S + offs_k, mask=mask_k, other=0.0)
                b = tl.load(B + b_ptrs, mask=mask_b, other=0.0).to(tl.float32) * s[None, :]
                a = tl.load(A + a_ptrs, mask=mask_a, other=0.0).to(tl.float32)
                acc = tl.dot(b, a, acc, input_precision="ieee")

    w_ptrs = W + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    mask = mask_m[:, None] & mask_n[None, :]
    out = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    if SOFT_RNE:
        tl.store(w_ptrs, to_bf16_rne(out), mask=mask)
    else:
        tl.store(w_ptrs, out.to(W.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


_HALF = (torch.float16, torch.bfloat16)


def _scale_groups(scale: torch.Tensor):
    """Runs of ranks whose scale is equal in every expert: (GK [NG + 1] int32 boundaries, shared, and
    GS [E, NG] fp32, each expert's scale per run), read once on the host. ``scale`` is [E, R]."""
    s = scale.tolist()
    R = len(s[0])
    starts = [0] + [k for k in range(1, R) if any(row[k] != row[k - 1] for row in s)]
    gk = torch.tensor(starts + [R], dtype=torch.int32, device=scale.device)
    gs = torch.tensor([[row[k] for k in starts] for row in s], dtype=torch.float32, device=scale.device)
    return gk, gs


def _split_bf16(x: torch.Tensor):
    """x (fp32) = hi + lo + (far below x's fp32 ulp · 2^8), hi and lo bf16, both contiguous."""
    hi = x.to(torch.bfloat16).contiguous()
    # An Inf's low part is 0, not Inf - Inf: an Inf factor merges as Inf (as on every other path).
    return hi, torch.where(hi.isinf(), 0.0, x - hi.to(torch.float32)).to(torch.bfloat16).contiguous()


def launch_meta(R: int, mode: int = MODE_HALF, groups: int = 1) -> dict:
    """The launch's block sizes, warps and stages for rank R in ``groups`` scale groups (also what
    ``portllm.inspection`` compiles). tl.dot needs every dimension >= 16; ranks are masked up to
    BLOCK_R. The fp32 (ieee) product takes ranks 32 at a time: at 64 its operands spilled to local
    memory on sm_80; so does the split product (three dots): at 64, 8 warps of 134-174 registers left
    one block per SM. Several scale groups keep a second fp32 tile (each group's sum): they take ranks
    16 at a time, 123 registers on sm_80 where 64 took 160 and 32 took 149 (``portllm.inspection``)."""
    if mode == MODE_HALF and groups > 1:
        block_r = 16
    else:
        block_r = min(64 if mode == MODE_HALF else 32, max(16, triton.next_power_of_2(R)))
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=block_r, GROUP_M=8, num_warps=8 if block_r >= 64 else 4,
                num_stages=2)


def patch_add_forward(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    """Host launcher. Arguments are checked by ``portllm.ops``; scale is fp32 [r] on W's device."""
    patch_add_experts_forward(W.unsqueeze(0), B.unsqueeze(0), A.unsqueeze(0), scale.unsqueeze(0))


def patch_add_experts_forward(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    """Host launcher of the batched merge, one launch for every expert: W [E, M, N], B [E, M, R],
    A [E, R, N], scale fp32 [E, R]; checked by ``portllm.ops``."""
    E, M, N = W.shape
    R = B.shape[2]
    if W.numel() == 0 or R == 0:
        return
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    scale = scale.contiguous()
    BL, AL = B, A
    gk = gs = scale  # (placeholders where the mode does not read them)
    ng = 0
    if W.dtype in _HALF and B.dtype == A.dtype and B.dtype in _HALF:
        mode = MODE_HALF
        gk, gs = _scale_groups(scale)
        ng = gs.shape[1]
        block_r = launch_meta(R, mode, ng)["BLOCK_R"]
        rp = -(-R // block_r) * block_r
        if rp != R or B.stride(2) != 1 or B.stride(1) != rp:  # whole, aligned chunks of B (see the kernel)
            padded = B.new_zeros(E, M, rp)
            padded[:, :, :R] = B
            B = BL = padded
    elif W.dtype in _HALF and B.dtype == A.dtype == torch.float32:
        mode = MODE_SPLIT
        B, BL = _split_bf16(B * scale[:, None, :])
        A, AL = _split_bf16(A)
    else:
        mode = MODE_FP32
    meta = launch_meta(R, mode, ng)
    grid = (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)
    _patch_add_kernel[grid](
        W, B, A, BL, AL, scale, gk, gs, M, N, R, ng,
        W.stride(1), W.stride(2), B.stride(1), B.stride(2), A.stride(1), A.stride(2),
        MODE=mode, UPCAST=interpret,
        SOFT_RNE=interpret and W.dtype == torch.bfloat16,
        stride_we=W.stride(0), stride_be=B.stride(0), stride_ae=A.stride(0), stride_se=scale.stride(0),
        stride_ge=gs.stride(0) if mode == MODE_HALF else 0, **meta,
    )
