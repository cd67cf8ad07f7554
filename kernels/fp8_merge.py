"""Triton fp8_merge: a patch merged into a block-scaled e4m3 weight, one program per block.

Implements the op ``portllm.ops.fp8_merge`` (backend ``triton``, registered as
``torch.ops.portllm.fp8_merge_triton``); tested against the reference, bit for bit, by
``tests/test_fp8_triton.py``.

One program owns one bm×bn block of W and walks it in SUB_M-row tiles, twice:
1. W = float(q)·scale_inv (fp32), W' = float32(float64(W) + Σ_k float64(Bs[:,k])·float64(A[k,:]))
   with k ascending (the products are exact in float64, so a fused multiply-add changes nothing), and
   the block's amax of |W'| (and whether it holds a NaN);
2. scale = (1 / amax)·448 as torch computes 448 / amax (1 for a block of zeros or with a NaN; IEEE
   division), scale_inv = 1 / scale; W'
   recomputed, x = W'·scale, clamped to ±448, rounded to an e4m3 code in integer arithmetic (nearest
   even, or the stochastic rounding of ``portllm.fp8.round_e4m3`` from the same counter-based hash), and
   the retention sums of the block in float64.
Recomputing W' costs a second pass of r float64 FMAs per element and keeps the registers to one tile.
The e4m3 codes are made from the fp32 bits, not by Triton's conversion (the interpreter truncates), so
they are the reference's on every target; a NaN's code keeps the sign its fp32 value had.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


@triton.jit
def _e4m3_code(x, u, STOCHASTIC: tl.constexpr):
    """x fp32 (|x| <= 448 or NaN) -> e4m3fn code (int32 0..255). ``u``: 20 random bits (int64) when
    STOCHASTIC: added below the 3 kept mantissa bits, then truncated (below 2^-6: floor(|x|·512 + u·2^-20))."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(x)
    ab = bits & 0x7FFFFFFF
    if STOCHASTIC:
        nb = (ab.to(tl.int64) + u) & ~0xFFFFF
        normal = ((nb >> 20) - 960).to(tl.int32)  # (exponent << 3 | mantissa) - ((127 - 7) << 3)
        sub = tl.floor(a * 512.0 + u.to(tl.float32) * 9.5367431640625e-07).to(tl.int32)
    else:
        rb = ab + 0x7FFFF + ((ab >> 20) & 1)
        normal = (rb >> 20) - 960
        t = a * 512.0  # below 2^-6 the grid is 2^-9: round half to even to an integer
        f = tl.floor(t)
        d = t - f
        fi = f.to(tl.int32)
        sub = tl.where((d > 0.5) | ((d == 0.5) & ((fi & 1) == 1)), fi + 1, fi)
    code = tl.where(a >= 0.015625, normal, sub)
    code = tl.where(x != x, 0x7F, code)
    return sign | code


@triton.jit
def _e4m3_value(code):
    """e4m3fn code (int32) -> fp32, exact; 0x7F / 0xFF -> NaN."""
    e = (code >> 3) & 0xF
    m = code & 7
    normal = ((e + 120) << 23) | (m << 20)
    v = tl.where(e > 0, normal.to(tl.float32, bitcast=True), m.to(tl.float32) * 0.001953125)
    v = tl.where((code & 0x7F) == 0x7F, float("nan"), v)
    return tl.where((code & 0x80) != 0, -v, v)


@triton.jit
def _merged(Q, BS, A, rows, cols, mask, N, R, inv_in):
    """(W, W') of a tile: rows are in range (masked rows replaced by row 0), mask the tile's elements."""
    code = tl.load(Q + rows[:, None] * N + cols[None, :], mask=mask, other=0).to(tl.int32)
    w = _e4m3_value(code) * inv_in
    acc = w.to(tl.float64)
    for k in range(0, R):
        b = tl.load(BS + rows * R + k)
        a = tl.load(A + k * N + cols, mask=cols < N, other=0.0)
        acc += b.to(tl.float64)[:, None] * a.to(tl.float64)[None, :]
    return w, acc.to(tl.float32)


@triton.jit
def _fp8_merge_kernel(
    Q,  # [M, N] uint8 (e4m3 codes)
    SI,  # [GM, GN] fp32 scale_inv
    BS,  # [M, R] fp32, B·diag(scale)
    A,  # [R, N] fp32
    QO,  # [M, N] uint8
    SO,  # [GM, GN] fp32
    SUMS,  # [GM * GN, 3] float64
    M,
    N,
    R,
    bm,
    bn,
    GN,
    key_lo,
    key_hi,
    STOCHASTIC: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    r0 = pid_m * bm
    cl = tl.arange(0, BLOCK_N)
    cols = pid_n * bn + cl
    cmask = (cl < bn) & (cols < N)
    inv_in = tl.load(SI + pid_m * GN + pid_n)
    amax = tl.full([], 0.0, tl.float32)
    nans = tl.full([], 0, tl.int32)
    for i in range(0, bm, SUB_M):
        rl = i + tl.arange(0, SUB_M)
        rows = r0 + rl
        rmask = (rl < bm) & (rows < M)
        mask = rmask[:, None] & cmask[None, :]
        _, w1 = _merged(Q, BS, A, tl.where(rmask, rows, 0), cols, mask, N, R, inv_in)
        amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(w1), 0.0)))
        nans += tl.sum(tl.where(mask & (w1 != w1), 1, 0))
    use = (nans == 0) & (amax > 0)
    # torch's 448 / amax is reciprocal(amax) · 448, two roundings: the same here
    scale = tl.where(use, tl.math.div_rn(tl.full([], 1.0, tl.float32), tl.where(use, amax, 1.0)) * 448.0, 1.0)
    inv = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
    tl.store(SO + pid_m * GN + pid_n, inv)
    dot = tl.full([], 0.0, tl.float64)
    d2 = tl.full([], 0.0, tl.float64)
    n2 = tl.full([], 0.0, tl.float64)
    for i in range(0, bm, SUB_M):
        rl = i + tl.arange(0, SUB_M)
        rows = r0 + rl
        rmask = (rl < bm) & (rows < M)
        mask = rmask[:, None] & cmask[None, :]
        safe_rows = tl.where(rmask, rows, 0)
        w, w1 = _merged(Q, BS, A, safe_rows, cols, mask, N, R, inv_in)
        x = w1 * scale
        x = tl.where(x > 448.0, 448.0, tl.where(x < -448.0, -448.0, x))  # (NaN stays NaN)
        if STOCHASTIC:
            idx = safe_rows.to(tl.int64)[:, None] * N + cols.to(tl.int64)[None, :]
            h = _fmix32((idx & 0xFFFFFFFF) ^ key_lo)
            h = _fmix32(h ^ ((idx >> 32) & 0xFFFFFFFF) ^ key_hi)
            code = _e4m3_code(x, h >> 12, True)
        else:
            code = _e4m3_code(x, 0, False)
        tl.store(QO + safe_rows[:, None] * N + cols[None, :], code.to(tl.uint8), mask=mask)
        wd = w.to(tl.float64)
        moved = (_e4m3_value(code) * inv).to(tl.float64) - wd
        delta = w1.to(tl.float64) - wd
        moved = tl.where(mask, moved, 0.0)
        delta = tl.where(mask, delta, 0.0)
        dot += tl.sum(moved * delta)
        d2 += tl.sum(delta * delta)
        n2 += tl.sum((moved - delta) * (moved - delta))
    p = pid_m * tl.num_programs(1) + pid_n
    tl.store(SUMS + p * 3, dot)
    tl.store(SUMS + p * 3 + 1, d2)
    tl.store(SUMS + p * 3 + 2, n2)


MAX_BLOCK = 256


def launch_meta(bm: int, bn: int) -> dict:
    """The launch's tile and warps for blocks of bm x bn (also what ``portllm.inspection`` compiles)."""
    block_n = max(16, triton.next_power_of_2(bn))
    return dict(BLOCK_N=block_n, SUB_M=max(1, min(triton.next_power_of_2(bm), 2048 // block_n)), num_warps=4)


def fp8_merge_forward(q: torch.Tensor, s: torch.Tensor, Bs: torch.Tensor, A: torch.Tensor, bm: int, bn: int,
                      stochastic: bool, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host launcher; arguments are checked by ``portllm.ops.fp8_merge`` (q as uint8 codes, s fp32
    [ceil(M/bm), ceil(N/bn)], Bs fp32 [M, R], A fp32 [R, N], all contiguous). Returns (q' uint8,
    scale_inv' fp32, float64 [3] sums)."""
    M, N = q.shape
    R = Bs.shape[1]
    GM, GN = s.shape
    if bn > MAX_BLOCK:
        raise ValueError(f"fp8_merge (triton): blocks of {bm}x{bn}; the Triton kernel takes blocks up to "
                         f"{MAX_BLOCK} columns wide (use the cpp or reference backend)")
    qo = torch.empty_like(q)
    so = torch.empty_like(s)
    sums = torch.zeros(GM * GN, 3, dtype=torch.float64, device=q.device)
    if M and N:
        key &= (1 << 64) - 1
        _fp8_merge_kernel[(GM, GN)](
            q, s, Bs, A, qo, so, sums, M, N, R, bm, bn, GN, key & 0xFFFFFFFF, key >> 32,
            STOCHASTIC=bool(stochastic), **launch_meta(bm, bn),
        )
    return qo, so, sums.sum(0)
