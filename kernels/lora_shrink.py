"""Triton lora_shrink: h[t] = x[t] · A[slots[t]]ᵀ in fp32, tokens grouped by slot.

Implements the op ``portllm.ops.lora_shrink`` (backend ``triton``, registered as
``torch.ops.portllm.lora_shrink_triton``); tested against the reference by ``tests/test_serve_ops.py``.

One program takes a tile of up to BLOCK_T tokens that share a slot (``lora_slots.token_tiles``) and
all R ranks: it streams x's rows and the slot's A over n, BLOCK_K at a time, into an fp32
[BLOCK_T, R] accumulator. bf16/fp16 operands of one dtype go to tl.dot as they are (their products
are exact in fp32); other combinations, and every case under the interpreter (where bf16 dots are
wrong), are converted to fp32 first and multiplied in full fp32 ("ieee").
"""

import os

import torch
import triton
import triton.language as tl

from portllm.kernels.lora_slots import block_t_for, tile_of, token_tiles, unpack


@triton.jit
def _lora_shrink_kernel(
    X,  # [T, N]
    A,  # [P, R, N]
    H,  # [T, R] fp32, zero-filled
    ORDER,  # [T] int64: tokens sorted by slot
    SEG_START,  # [P] int64
    SEG_COUNT,  # [P] int64
    TILE_START,  # [P + 1] int64
    N,
    R,
    P,
    stride_xt,
    stride_xn,
    stride_ap,
    stride_ar,
    stride_an,
    stride_ht,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    P_POW2: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    p, offs, mask_t = tile_of(pid, TILE_START, SEG_START, SEG_COUNT, P, BLOCK_T, P_POW2)
    tok = tl.load(ORDER + offs, mask=mask_t, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < N
        x = tl.load(X + tok[:, None] * stride_xt + offs_k[None, :] * stride_xn,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(A + p * stride_ap + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_an,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_K, BLOCK_R] = A[p]ᵀ tile
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a, acc)
    tl.store(H + tok[:, None] * stride_ht + offs_r[None, :], acc, mask=mask_t[:, None] & mask_r[None, :])


def launch_meta(T: int, R: int, P: int) -> dict:
    """The launch's block sizes and warps for T tokens, rank R, P patches (also what
    ``portllm.inspection`` compiles)."""
    return dict(BLOCK_T=block_t_for(T), BLOCK_R=max(16, triton.next_power_of_2(R)), BLOCK_K=64 if R > 32 else 128,
                P_POW2=max(2, triton.next_power_of_2(P)), num_warps=4)


def lora_shrink_forward(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor,
                        tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Host launcher; arguments are checked by ``portllm.ops.lora_shrink``. ``tiles``: the
    grouping of ``slots`` (``lora_slots.token_tiles``), computed here if not given."""
    T, N = x.shape
    P, R, _ = A.shape
    h = torch.zeros(T, R, dtype=torch.float32, device=x.device)
    if T == 0 or R == 0:
        return h
    if tiles is None:
        tiles = token_tiles(slots, P)
    order, seg_start, seg_count, tile_start, _, grid = unpack(tiles, T, P)
    upcast = (x.dtype != A.dtype or x.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1")
    _lora_shrink_kernel[(grid,)](
        x, A, h, order, seg_start, seg_count, tile_start, N, R, P,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), h.stride(0),
        UPCAST=upcast, **launch_meta(T, R, P),
    )
    return h
