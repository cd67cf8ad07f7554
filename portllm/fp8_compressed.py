"""Merging a patch into a compressed-tensors FP8 weight (llm-compressor's FP8, FP8_DYNAMIC and
FP8_BLOCK schemes: ``quant_method: "compressed-tensors"``, format ``float-quantized``).

The format, as compressed-tensors 0.20 writes and reads it (``quantization/lifecycle/forward*.py``,
``quantization/utils/helpers.py``): ``weight`` float8_e4m3fn [M, N] and ``weight_scale`` in the
model's dtype (bfloat16 for a bf16 model), one per tensor ([1]), per output channel ([M, 1]) or per
block ([ceil(M/bm), ceil(N/bn)]); symmetric, no zero point. Everything is computed in the scale's
dtype ``sd``:

    W     = q.to(sd) · scale                                   (its dequantization: what the model computes with)
    scale = amax(|W|) / 448, in sd; a zero scale becomes finfo(sd).eps
    q     = clamp(W / scale + 0, ±448).to(e4m3), the division in sd (+ 0: the zero point of zeros
            llm-compressor's compression passes, which turns −0 into +0)

The merge, band by band of rows (no M×N temporary beyond a band; a per-tensor scale takes a first
pass for the amax):

    W' = float32(float64(W) + Σ_k float64(B[:,k]·s[k])·float64(A[k,:]))      as ``portllm.fp8``
    nearest:    q', scale' = compressed-tensors' quantizer of W'.to(sd), bit for bit (what llm-compressor
                writes for the merged model in its dtype)
    stochastic: scale' as above; q' = the stochastic rounding of W' / scale' in fp32 (``fp8.round_e4m3``:
                unbiased, seeded), not rounded to sd first, which would erase an update below sd's step

and the retention sums of ``portllm.fp8`` (Q(W') being q'.to(sd) · scale').
"""

from __future__ import annotations

import torch

from portllm import fp8

STRATEGIES = ("tensor", "channel", "block")
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def block_of(strategy: str, shape, block: tuple[int, int] | None = None) -> tuple[int, int]:
    """The block one scale covers in a weight of ``shape`` [M, N]: (M, N) per tensor, (1, N) per
    channel, ``block`` per block."""
    M, N = shape
    return {"tensor": (M, N), "channel": (1, N)}.get(strategy) or tuple(block)


def scale_grid(scale: torch.Tensor, shape, block: tuple[int, int]) -> torch.Tensor:
    """The scale as a 2-D grid [ceil(M/bm), ceil(N/bn)] (a [1] tensor scale as [1, 1])."""
    M, N = shape
    return scale.reshape(-(-M // block[0]), -(-N // block[1]))


def check_scales(shape, dtype: torch.dtype, scale: torch.Tensor, strategy: str, block, name: str):
    """FP8FormatError naming the tensor unless ``name`` is a 2-D e4m3 weight of ``shape`` and ``scale``
    its compressed-tensors scale for ``strategy``: the expected shape, a float dtype, finite and positive."""
    if dtype != fp8.E4M3 or len(shape) != 2:
        raise fp8.FP8FormatError(f"tensor {name}: expected a 2-D float8_e4m3fn weight, got {dtype} {tuple(shape)}")
    M, N = shape
    bm, bn = block_of(strategy, shape, block)
    want = {"tensor": [(1,), (), (1, 1)], "channel": [(M, 1)]}.get(strategy, [(-(-M // bm), -(-N // bn))])
    if tuple(scale.shape) not in want:
        raise fp8.FP8FormatError(f"tensor {name}_scale: shape {tuple(scale.shape)} does not match the weight "
                                 f"{tuple(shape)} with {strategy} scales (expected {want[0]})")
    if scale.dtype not in SCALE_DTYPES:
        raise fp8.FP8FormatError(f"tensor {name}_scale: dtype {scale.dtype}; compressed-tensors FP8 scales are "
                                 "bfloat16, float16 or float32")
    s = scale.float()
    bad = int((~torch.isfinite(s) | (s <= 0)).sum())
    if bad:
        raise fp8.FP8FormatError(f"tensor {name}_scale: {bad} of {s.numel()} scales are not finite and positive")


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """q.to(sd) · scale in the scale's dtype sd, as compressed-tensors decompresses (``_dequantize``)."""
    grid = scale_grid(scale, q.shape, block)
    return q.to(scale.dtype) * fp8._expand(grid, q.shape[0], q.shape[1], block)


def _amax(W: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    M, N = W.shape
    pad = torch.nn.functional.pad(W.abs(), (0, (-N) % bn, 0, (-M) % bm))
    return pad.reshape(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))


def scales_for(amax: torch.Tensor, sd: torch.dtype) -> torch.Tensor:
    """compressed-tensors' ``calculate_qparams`` for symmetric e4m3: amax / 448 in sd, zero -> eps."""
    s = amax.to(sd) / torch.tensor(fp8.E4M3_MAX, dtype=sd)
    return torch.where(s == 0, torch.tensor(torch.finfo(sd).eps, dtype=sd), s)


def quantize(W: torch.Tensor, block: tuple[int, int], sd: torch.dtype, rounding: str = "nearest", *,
             key: int = 0, first_row: int = 0, row_len: int | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 W (a band of whole blocks) -> (q e4m3, scale grid in sd), as the module docstring says.
    ``scale``: a grid computed beforehand (a per-tensor scale over bands). Stochastic rounding draws from
    ``key`` at each element's flat index in the whole weight (row ``first_row`` on, rows of ``row_len``)."""
    Ws = W.to(sd)
    if scale is None:
        scale = scales_for(_amax(Ws, block), sd)
    S = fp8._expand(scale, W.shape[0], W.shape[1], block)
    if rounding == "nearest":  # (+ 0: the symmetric zero point llm-compressor adds; −0 becomes +0, as there)
        return (Ws / S + 0.0).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3), scale
    N = W.shape[1] if row_len is None else row_len
    index = (torch.arange(first_row, first_row + W.shape[0], dtype=torch.int64)[:, None] * N
             + torch.arange(W.shape[1], dtype=torch.int64)[None, :])
    return fp8.round_e4m3(W / S.float(), "stochastic", key=key, index=index), scale


def _merged_band(q, scale_grid_, Bs, Ad, block, i0, i1):
    W = dequantize_band(q[i0:i1], scale_grid_, block, i0)
    acc = W.double()
    for k in range(Bs.shape[1]):
        acc += Bs[i0:i1, k:k + 1].double() * Ad[k:k + 1]
    return W, acc.float()


def dequantize_band(qb: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], i0: int) -> torch.Tensor:
    bm = block[0]
    rows = grid[i0 // bm:-(-(i0 + qb.shape[0]) // bm)]
    return qb.to(grid.dtype) * fp8._expand(rows, qb.shape[0], qb.shape[1], block)


def merge_(q: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor,
           block: tuple[int, int], *, rounding: str = "nearest", seed: int = 0,
           band: int = 256, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, fp8.Retention]:
    """The compressed-tensors FP8 merge (module docstring): the new (q, scale), scale in its input's
    shape and dtype, and the retention sums; q, scale are not modified. ``block``: ``block_of``.
    A merged weight that is not finite in the scale's dtype (an fp16 overflow) raises ValueError
    naming ``name``, before anything is returned."""
    if rounding not in fp8.ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(fp8.ROUNDINGS)}, got {rounding!r}")
    M, N = q.shape
    bm, bn = block
    whole = bm >= M and bn >= N  # one scale for the whole weight
    step = max(1, band) if whole else bm * max(1, band // bm)  # bands of whole blocks (any size if whole)
    grid = scale_grid(scale, q.shape, block)
    sd = scale.dtype
    Bs = (B.float() * s.float()[None, :]).contiguous()
    Ad = A.float().double()
    key = fp8.stream_key(seed)
    tensor_scale = None
    if whole:  # one scale for the whole weight: the amax of W' first
        amax = torch.zeros((), dtype=torch.float32)
        for i0 in range(0, M, step):
            _, W1 = _merged_band(q, grid, Bs, Ad, block, i0, min(M, i0 + step))
            amax = torch.maximum(amax, W1.to(sd).float().abs().amax())
        tensor_scale = scales_for(amax.reshape(1, 1), sd)
    out_q, out_s = torch.empty_like(q), torch.empty_like(grid)

    def finite(sc):
        if not bool(torch.isfinite(sc).all()):
            raise ValueError(f"tensor {name}: the merged weight is not finite in {str(sd).removeprefix('torch.')} "
                             "(its scales' dtype): the patch overflows it")
    if tensor_scale is not None:
        finite(tensor_scale)
    sums = torch.zeros(3, dtype=torch.float64)
    for i0 in range(0, M, step):
        i1 = min(M, i0 + step)
        W, W1 = _merged_band(q, grid, Bs, Ad, block, i0, i1)
        qb, sb = quantize(W1, block, sd, rounding, key=key, first_row=i0, row_len=N, scale=tensor_scale)
        if tensor_scale is None:
            finite(sb)
        out_q[i0:i1] = qb
        if tensor_scale is None:
            out_s[i0 // bm:-(-i1 // bm)] = sb
        moved = dequantize_band(qb, sb, block, 0).double() - W.double()
        delta = W1.double() - W.double()
        sums += torch.stack([(moved * delta).sum(), (delta * delta).sum(), ((moved - delta) ** 2).sum()])
    if tensor_scale is not None:
        out_s = tensor_scale
    dot, d2, n2 = sums.tolist()
    return out_q, out_s.reshape(scale.shape), fp8.Retention(dot, d2, n2)
