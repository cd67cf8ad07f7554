"""Triton lora_expand_: y[t] ← round(y[t] + scale[p]·(h[t] · B[p]ᵀ)), p = slots[t], in place.

Implements the op ``portllm.ops.lora_expand_`` (backend ``triton``, registered as
``torch.ops.portllm.lora_expand_triton_``); tested against the reference by ``tests/test_serve_ops.py``.

One program owns a tile of up to BLOCK_T tokens of one slot (``lora_slots.token_tiles``) and
BLOCK_M output columns: the fp32 product h·B[p]ᵀ (K = R, small), scaled once, added to y's tile in
fp32 and rounded once. Tokens routed to no patch belong to no tile and are never read or written.

With bf16 factors (``SPLIT_H``) the product runs on the tensor cores: h (fp32, 24 significant bits) is
split exactly into three bf16 pieces, h = h₁ + h₂ + h₃ (8 bits each), and h·Bᵀ = h₁·Bᵀ + h₂·Bᵀ + h₃·Bᵀ:
bf16 × bf16 products are exact in fp32, so only the fp32 sums round, as in the fp32 (ieee) product
it replaces (``portllm.inspection`` found that one on fp32 FMAs). fp16 and fp32 factors keep the fp32
product (an fp16 piece of h could overflow or underflow). Under ``TRITON_INTERPRET=1`` (``UPCAST``)
the pieces are multiplied in fp32: the interpreter's bf16 dot is wrong.
"""

import os

import torch
import triton
import triton.language as tl

from portllm.kernels.lora_slots import block_t_for, tile_of, token_tiles, unpack
from portllm.kernels.rounding import to_bf16_rne


@triton.jit
def _lora_expand_kernel(
    Y,  # [T, M]
    H,  # [T, R] fp32
    B,  # [P, M, R]
    S,  # [P] fp32
    ORDER,
    SEG_START,
    SEG_COUNT,
    TILE_START,
    M,
    R,
    P,
    stride_yt,
    stride_ym,
    stride_ht,
    stride_bp,
    stride_bm,
    stride_br,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    P_POW2: tl.constexpr,
    SPLIT_H: tl.constexpr = False,
    UPCAST: tl.constexpr = False,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    p, offs, mask_t = tile_of(pid, TILE_START, SEG_START, SEG_COUNT, P, BLOCK_T, P_POW2)
    tok = tl.load(ORDER + offs, mask=mask_t, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    h = tl.load(H + tok[:, None] * stride_ht + offs_r[None, :], mask=mask_t[:, None] & mask_r[None, :], other=0.0)
    b = tl.load(B + p * stride_bp + offs_r[:, None] * stride_br + offs_m[None, :] * stride_bm,
                mask=mask_r[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_R, BLOCK_M] = B[p]ᵀ
    if SPLIT_H:
        h1 = h.to(tl.bfloat16)
        rest = h - h1.to(tl.float32)  # exact
        h2 = rest.to(tl.bfloat16)
        h3 = (rest - h2.to(tl.float32)).to(tl.bfloat16)  # exact: the last 8 bits
        if UPCAST:
            bf = b.to(tl.float32)
            acc = tl.dot(h1.to(tl.float32), bf, input_precision="ieee")
            acc = tl.dot(h2.to(tl.float32), bf, acc, input_precision="ieee")
            acc = tl.dot(h3.to(tl.float32), bf, acc, input_precision="ieee")
        else:
            acc = tl.dot(h1, b)
            acc = tl.dot(h2, b, acc)
            acc = tl.dot(h3, b, acc)
    else:
        acc = tl.dot(h, b.to(tl.float32), input_precision="ieee")
    acc = acc * tl.load(S + p)
    mask = mask_t[:, None] & mask_m[None, :]
    y_ptrs = Y + tok[:, None] * stride_yt + offs_m[None, :] * stride_ym
    out = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc
    if Y.dtype.element_ty == tl.bfloat16:
        tl.store(y_ptrs, to_bf16_rne(out), mask=mask)
    else:
        tl.store(y_ptrs, out.to(Y.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def launch_meta(T: int, R: int, P: int) -> dict:
    """The launch's block sizes and warps for T tokens, rank R, P patches (also what
    ``portllm.inspection`` compiles)."""
    return dict(BLOCK_T=block_t_for(T), BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_M=128,
                P_POW2=max(2, triton.next_power_of_2(P)), num_warps=4)


def lora_expand_forward(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                        slots: torch.Tensor, tiles: torch.Tensor | None = None) -> None:
    """Host launcher; arguments are checked by ``portllm.ops.lora_expand_``. ``tiles``: the
    grouping of ``slots`` (``lora_slots.token_tiles``), computed here if not given."""
    T, M = y.shape
    P, _, R = B.shape
    if T == 0 or M == 0 or R == 0:
        return
    if tiles is None:
        tiles = token_tiles(slots, P)
    order, seg_start, seg_count, tile_start, _, grid = unpack(tiles, T, P)
    meta = launch_meta(T, R, P)
    _lora_expand_kernel[(grid, triton.cdiv(M, meta["BLOCK_M"]))](
        y, h, B, scale, order, seg_start, seg_count, tile_start, M, R, P,
        y.stride(0), y.stride(1), h.stride(0), B.stride(0), B.stride(1), B.stride(2),
        SPLIT_H=B.dtype == torch.bfloat16, UPCAST=os.environ.get("TRITON_INTERPRET") == "1", **meta,
    )
