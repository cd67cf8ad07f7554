"""Merging a patch into MXFP8 weights (compressed-tensors' ``mxfp8-quantized``, llm-compressor's MXFP8 and
MXFP8A16 schemes), as the other FP8 formats: dequantize, add s·B·A, requantize with the format's own
quantizer, and the retention sums of ``portllm.fp8``.

The layout, as compressed-tensors 0.20 writes and reads it (``compressors/mxfp8``, ``mx_utils``,
``quantization/utils/mxfp_utils.py``), for a Linear weight [M, N] (N a multiple of 32):

    weight        float8_e4m3fn [M, N]
    weight_scale  uint8 [M, N/32]     one e8m0 scale 2^(byte − 127) per group of 32 inputs
    W = q · 2^(byte − 127)            exact in fp32 (the loader computes it in bf16: exact too, for
                                      bytes up to MAX_SCALE)

The merge, band by band of rows:

    W' = float32(float64(W) + Σ_k float64(Bs[:, k])·float64(A[k]))     k ascending, as the other merges
    byte' = compressed-tensors' ``generate_mx_scales`` of the group's fp32 amax: amax rounded to a power
            of two p on its bits ((bits + 2^21) & 0xFF800000: up from 1.75·2^k), byte = log2(p) + 127 − 8
            (8 = floor(log2 448)), clamped to [0, 255]
    q' = W' / 2^(byte' − 127) (exact), + 0 (the symmetric zero point llm-compressor adds: −0 becomes
         +0), clamped to ±448, to e4m3: nearest even, or stochastic (``fp8.round_e4m3``, seeded, at the
         element's flat index)

The scales are always the quantizer's ("fresh", as for the other FP8 formats): they are powers of two
that move only when a group's largest value crosses 1.75·2^k, and e4m3's 3 mantissa bits, not the
scale, decide what survives.
"""

from __future__ import annotations

import torch

from portllm import fp8

GROUP = 32
NAN_SCALE = 255
MAX_SCALE = 246  # 448·2^(246−127) < bf16's largest value; above, codes overflow as the loader dequantizes
_ROWS_ELEMS = 1 << 20


class MXFP8FormatError(fp8.FP8FormatError):
    """An MXFP8 tensor portllm cannot merge into; the message names the tensor."""


def check(name: str, shape, dtype, scale: torch.Tensor):
    """MXFP8FormatError naming the tensor unless ``name`` is float8_e4m3fn [M, N] (N a multiple of 32) and
    ``name``_scale uint8 [M, N/32] with every byte at most MAX_SCALE."""
    shape = tuple(shape)
    if dtype != fp8.E4M3 or len(shape) != 2 or 0 in shape or shape[1] % GROUP:
        raise MXFP8FormatError(f"tensor {name}: expected a 2-D float8_e4m3fn weight [out, in], in a multiple of "
                               f"{GROUP}, got {dtype} {shape}")
    want = (shape[0], shape[1] // GROUP)
    if scale.dtype != torch.uint8 or tuple(scale.shape) != want:
        raise MXFP8FormatError(f"tensor {name}_scale: expected uint8 {want} (one e8m0 scale per {GROUP} inputs of "
                               f"{name} {shape}), got {scale.dtype} {tuple(scale.shape)}")
    bad = int((scale == NAN_SCALE).sum())
    if bad:
        raise MXFP8FormatError(f"tensor {name}_scale: {bad} of {scale.numel()} group scales are NaN (e8m0 byte 255)")
    huge = int((scale > MAX_SCALE).sum())
    if huge:
        raise MXFP8FormatError(f"tensor {name}_scale: {huge} of {scale.numel()} group scales are above 2^"
                               f"{MAX_SCALE - 127} (byte > {MAX_SCALE}), where e4m3 codes overflow bfloat16 as "
                               "compressed-tensors dequantizes them")


def _pow2(scale: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, scale.to(torch.float64) - 127)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N]: q · 2^(byte − 127), exact."""
    M = q.shape[0]
    return (q.double().reshape(M, -1, GROUP) * _pow2(scale)[..., None]).reshape(M, -1).float()


def fresh_scales(W: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' MXFP8 scale bytes for fp32 W [M, N] (``generate_mx_scales``)."""
    amax = W.reshape(W.shape[0], -1, GROUP).abs().amax(-1).contiguous()
    p = (amax.view(torch.int32).to(torch.int64) + (1 << 21)) & 0xFF800000
    return ((p >> 23) - 8).clamp(0, 255).to(torch.uint8)


def quantize(W: torch.Tensor, scale: torch.Tensor, rounding: str = "nearest", *, key: int = 0,
             first: int = 0) -> torch.Tensor:
    """fp32 W [M, N] on the given scale bytes -> e4m3 [M, N]; stochastic rounding draws at flat index
    ``first`` + row·N + column."""
    M, N = W.shape
    x = ((W.double().reshape(M, -1, GROUP) / _pow2(scale)[..., None]).float() + 0.0).reshape(M, N)
    index = None
    if rounding == "stochastic":
        index = first + torch.arange(M * N, dtype=torch.int64, device=W.device).reshape(M, N)
    return fp8.round_e4m3(x, rounding, key=key, index=index)


def merge_(q: torch.Tensor, scale: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, *,
           rounding: str = "nearest", seed: int = 0, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor,
                                                                                    fp8.Retention]:
    """The MXFP8 merge (module docstring): the new (q, scale) and the retention sums; the inputs are not
    modified. A merged weight that is not finite raises NonFiniteMergeError naming ``name``."""
    from portllm.merge import NonFiniteMergeError

    if rounding not in fp8.ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(fp8.ROUNDINGS)}, got {rounding!r}")
    M, N = q.shape
    Bs = (B.float() * torch.as_tensor(s, dtype=torch.float32)).contiguous()
    Ad = A.float().double()
    key = fp8.stream_key(seed)
    out_q, out_s = torch.empty_like(q), torch.empty_like(scale)
    st = fp8.Retention()
    rows = max(1, _ROWS_ELEMS // N)
    for i0 in range(0, M, rows):
        i1 = min(M, i0 + rows)
        W = dequantize(q[i0:i1], scale[i0:i1])
        acc = W.double()
        for k in range(Bs.shape[1]):
            acc += Bs[i0:i1, k:k + 1].double() * Ad[k:k + 1]
        W1 = acc.float()
        if not bool(torch.isfinite(W1).all()):
            raise NonFiniteMergeError(f"tensor {name}: the merged weight has NaN or Inf values (rows {i0}:{i1}); "
                                      "nothing written")
        sc = fresh_scales(W1)
        if bool((sc > MAX_SCALE).any()):
            raise NonFiniteMergeError(f"tensor {name}: the merged weight needs a scale above 2^{MAX_SCALE - 127}, "
                                      "beyond what MXFP8 holds finite in bfloat16; nothing written")
        qb = quantize(W1, sc, rounding, key=key, first=i0 * N)
        out_q[i0:i1], out_s[i0:i1] = qb, sc
        Wd = W.double()
        moved, delta = dequantize(qb, sc).double() - Wd, W1.double() - Wd
        st.add(fp8.Retention(float((moved * delta).sum()), float((delta * delta).sum()),
                             float(((moved - delta) ** 2).sum())))
    return out_q, out_s, st
