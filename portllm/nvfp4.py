"""Merging a patch into NVFP4 weights (compressed-tensors' ``nvfp4-pack-quantized``, llm-compressor's
NVFP4 and NVFP4A16 schemes): dequantize, add s·B·A, requantize onto the e2m1 grid, and say how much of
the update survived.

The layout, as compressed-tensors 0.20 writes and reads it (``compressors/nvfp4``, what transformers'
``from_pretrained(..., quantization_config=CompressedTensorsConfig(dequantize=True))`` runs on a CPU),
for a Linear weight [M, N] (N a multiple of 16):

    weight_packed        uint8 [M, N/2]          two e2m1 codes a byte: element 2j in the low nibble
    weight_scale         float8_e4m3fn [M, N/16] one scale per group of 16 inputs
    weight_global_scale  float32 [1]             g; the group's step is d = fl32(scale / g)
    W = bf16(fl32(e2m1(code) · d))               a code's bit 3 is its sign, bits 0–2 index 0, .5, 1, 1.5, 2, 3, 4, 6

(ModelOpt's NVFP4 stores ``weight_scale_2`` = 1/g; compressed-tensors converts those checkpoints.)

The merge, band by band of rows, everything in fp32 where compressed-tensors computes in fp32:

    W  = fl32(e2m1(code) · d)                                          the loader's value before its bf16 cast
    W' = float32(float64(W) + Σ_k float64(Bs[:, k])·float64(A[k]))     k ascending, as the other merges
    scales, by ``policy``:
      "reuse"  g and every group's scale kept; a group with some |W'/d| ≥ 7 does not fit (nearest rounding
               on the grid extended by its next step, 8, would leave the grid) and gets the scale "fresh"
               gives it under the same g (``on_clip="rescale"``, counted) or is refused (``"refuse"``).
               Where a group does not fit even e4m3's largest scale under g (the update outgrew the weight's
               global range), the whole weight is requantized "fresh" instead (``refreshed`` on the result)
               Values in (6, 7) saturate at 6, as nearest rounding would round them anyway
      "fresh"  compressed-tensors' quantizer of W' (``generate_gparam``, ``calculate_qparams``):
               g = fl32(fl32(1 / max(amax(|W'|), tiny))·2688) (1 where that is not finite: 448·6 / amax, a
               Python float over a tensor, which torch computes as a reciprocal and a product); a group's scale
               e4m3(clamp(fl32(g · fl32(amax/6)), ±448)), 0 -> 0.125
    codes: x = fl32(W' / d) onto the e2m1 grid, saturating at ±6, the sign bit set where x < 0 (so −0
    gives code 0, and −0.1 code 8, −0, as compressed-tensors' sign(x)·|rounded| does):
      "nearest"     nearest, ties to the even code (compressed-tensors' ``cast_to_fp4``, bit for bit)
      "stochastic"  as ``portllm.mxfp4.round_e2m1`` (20 random bits per element, at its flat index in the
                    weight), so E[Q(x)] = x to within 2^-20 of a step

and the retention sums of ``portllm.mxfp4`` for both roundings (Q(W') dequantized as W is).
"""

from __future__ import annotations

import math

import torch

from portllm import mxfp4
from portllm.fp8 import E4M3, E4M3_MAX, FP8FormatError, Retention, stream_key

GROUP = 16
SCALE_EPS = 0.125  # compressed-tensors' replacement for a zero e4m3 scale
_ROWS_ELEMS = 1 << 20  # band size, in elements of the weight


class NVFP4FormatError(FP8FormatError):
    """An NVFP4 tensor or setting portllm cannot merge into; the message names the tensor or field."""


def check(name: str, packed_shape, packed_dtype, scale: torch.Tensor, global_scale: torch.Tensor):
    """NVFP4FormatError naming the tensor unless ``name``.weight_packed is uint8 [M, N/2] with N a multiple
    of 16, ``weight_scale`` float8_e4m3fn [M, N/16] finite and positive, ``weight_global_scale`` one
    finite positive float32."""
    shape = tuple(packed_shape)
    if packed_dtype != torch.uint8 or len(shape) != 2 or 0 in shape or shape[1] % (GROUP // 2):
        raise NVFP4FormatError(f"tensor {name}.weight_packed: expected uint8 [out, in/2] (two e2m1 codes a byte, in a "
                               f"multiple of {GROUP}), got {packed_dtype} {shape}")
    want = (shape[0], shape[1] * 2 // GROUP)
    if scale.dtype != E4M3 or tuple(scale.shape) != want:
        raise NVFP4FormatError(f"tensor {name}.weight_scale: expected float8_e4m3fn {want} (one scale per {GROUP} "
                               f"inputs of {name}.weight_packed {shape}), got {scale.dtype} {tuple(scale.shape)}")
    s = scale.float()
    bad = int((~torch.isfinite(s) | (s <= 0)).sum())
    if bad:
        raise NVFP4FormatError(f"tensor {name}.weight_scale: {bad} of {s.numel()} group scales are not finite and "
                               "positive")
    if global_scale.dtype != torch.float32 or global_scale.numel() != 1 or global_scale.dim() > 1:
        raise NVFP4FormatError(f"tensor {name}.weight_global_scale: expected float32 [1], got {global_scale.dtype} "
                               f"{tuple(global_scale.shape)}")
    g = float(global_scale.reshape(()))
    if not (math.isfinite(g) and g > 0):
        raise NVFP4FormatError(f"tensor {name}.weight_global_scale: {g} is not finite and positive")


def steps(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """d = fl32(scale / g) per group, fp32 [M, N/16]."""
    return scale.float() / global_scale.float().reshape(1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [M, N/2] -> int64 codes [M, N] (element 2j from the low nibble)."""
    b = packed.to(torch.int64)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(packed.shape[0], -1)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int64 codes [M, N] -> uint8 [M, N/2]."""
    c = codes.reshape(codes.shape[0], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8)


def _values(codes: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(mxfp4.VALUES, dtype=torch.float32, device=codes.device)
    return torch.cat([lut, -lut])[codes]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 [M, N]: fl32(e2m1(code) · fl32(scale / g)), the loader's value before its cast to bf16."""
    M = packed.shape[0]
    d = steps(scale, global_scale)
    return (_values(unpack(packed)).reshape(M, -1, GROUP) * d[..., None]).reshape(M, -1)


def global_scale_for(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` for NVFP4 from the weight's fp32 amax: float32 [1]."""
    a = amax.float().reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    g = E4M3_MAX * mxfp4.E2M1_MAX / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def group_scales(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``calculate_qparams`` for NVFP4 from fp32 group amaxes: float8_e4m3fn."""
    s = global_scale.float().reshape(1) * (amax.float() / mxfp4.E2M1_MAX)
    q = s.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return torch.where(q.float() == 0, torch.tensor(SCALE_EPS), q.float()).to(E4M3)


def quantize(W: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, stochastic: bool = False, *,
             key: int = 0, first: int = 0) -> torch.Tensor:
    """fp32 W [M, N] on the given scales -> packed uint8 [M, N/2]; stochastic rounding draws at flat index
    ``first`` + row·N + column."""
    M, N = W.shape
    # (+ 0: −0 becomes +0, whose code is 0, as compressed-tensors' sign(x)·|rounded| gives; a negative x
    # that rounds to zero keeps its sign: code 8)
    x = (W.reshape(M, -1, GROUP) / steps(scale, global_scale)[..., None]).double() + 0.0
    index = None
    if stochastic:
        index = first + torch.arange(M * N, dtype=torch.int64, device=W.device).reshape(M, -1, GROUP)
    return pack(mxfp4.round_e2m1(x, stochastic, key=key, index=index).reshape(M, N))


def _bands(M: int, N: int):
    rows = max(1, _ROWS_ELEMS // max(1, N))
    for i0 in range(0, M, rows):
        yield i0, min(M, i0 + rows)


def _merged(packed, scale, global_scale, Bs, Ad, i0, i1):
    W = dequantize(packed[i0:i1], scale[i0:i1], global_scale)
    acc = W.double()
    for k in range(Bs.shape[1]):
        acc += Bs[i0:i1, k:k + 1].double() * Ad[k:k + 1]
    return W, acc.float()


def _group_amax(W: torch.Tensor) -> torch.Tensor:
    return W.reshape(W.shape[0], -1, GROUP).abs().amax(-1)


def merge_(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor, B: torch.Tensor,
           A: torch.Tensor, s, *, policy: str = "reuse", on_clip: str = "rescale", rounding: str = "nearest",
           seed: int = 0, name: str = "weight") -> mxfp4.MergeResult:
    """The NVFP4 merge (module docstring) of one weight; the inputs are not modified. Returns an
    ``mxfp4.MergeResult`` whose ``blocks``/``scales`` are the new weight_packed / weight_scale, with
    ``global_scale`` and ``refreshed`` (requantized "fresh" because the update outgrew its global scale)
    set on it; ``rescaled`` holds flat indices of rescaled groups."""
    from portllm.merge import NonFiniteMergeError

    if policy not in mxfp4.POLICIES:
        raise ValueError(f"NVFP4 scale policy must be one of {', '.join(mxfp4.POLICIES)}, got {policy!r}")
    if on_clip not in mxfp4.ON_CLIP:
        raise ValueError(f"on_clip must be one of {', '.join(mxfp4.ON_CLIP)}, got {on_clip!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be nearest or stochastic, got {rounding!r}")
    M, N = packed.shape[0], packed.shape[1] * 2
    G = N // GROUP
    Bs = (B.to(torch.float32) * torch.as_tensor(s, dtype=torch.float32)).contiguous()
    Ad = A.to(torch.float32).double()
    g = global_scale.float().reshape(1)
    if policy == "fresh":  # the amax of W' first, for the global scale
        amax = torch.zeros((), dtype=torch.float32)
        for i0, i1 in _bands(M, N):
            amax = torch.maximum(amax, _merged(packed, scale, global_scale, Bs, Ad, i0, i1)[1].abs().amax())
        if not math.isfinite(float(amax)):
            raise NonFiniteMergeError(f"tensor {name}.weight_packed: the merged weight has NaN or Inf values; "
                                      "nothing written")
        g = global_scale_for(amax)
    out = mxfp4.MergeResult(torch.empty_like(packed), torch.empty_like(scale))
    out.global_scale = g.reshape(global_scale.shape).clone()
    out.refreshed = False
    key = stream_key(seed)
    stochastic = rounding == "stochastic"
    sums = torch.zeros(2, 3, dtype=torch.float64)
    for i0, i1 in _bands(M, N):
        W, W1 = _merged(packed, scale, global_scale, Bs, Ad, i0, i1)
        if not bool(torch.isfinite(W1).all()):
            raise NonFiniteMergeError(f"tensor {name}.weight_packed: the merged weight has NaN or Inf values (rows "
                                      f"{i0}:{i1}); nothing written")
        amax = _group_amax(W1)
        if policy == "fresh":
            sc = group_scales(amax, g)
        else:
            sc = scale[i0:i1].clone()
            over = ~(amax / steps(sc, g) < mxfp4.CLIP)
            n = int(over.sum())
            if n:
                where = over.reshape(-1).nonzero()[:, 0]
                r0, g0 = divmod(int(where[0]), G)
                if on_clip == "refuse":
                    raise mxfp4.ClippedBlockError(
                        f"tensor {name}.weight_packed: {n} group(s) do not fit their scale after the merge (first: row "
                        f"{i0 + r0}, columns {g0 * GROUP}:{(g0 + 1) * GROUP}, scale {float(scale[i0 + r0, g0].float())}); "
                        "nothing written; let them be rescaled (on_clip='rescale') or use policy 'fresh'")
                sc = torch.where(over, group_scales(amax, g), sc)
                if not bool((amax / steps(sc, g) < mxfp4.CLIP).all()):
                    # the merged weight outgrew its global scale: the whole weight requantized fresh
                    res = merge_(packed, scale, global_scale, B, A, s, policy="fresh", on_clip=on_clip,
                                 rounding=rounding, seed=seed, name=name)
                    res.refreshed = True
                    return res
                out.rescaled += (where[:max(0, 8 - len(out.rescaled))] + i0 * G).tolist()
                out.rescaled_count += n
        out.scales[i0:i1] = sc
        Wd, delta = W.double(), W1.double() - W.double()
        for j, st in enumerate((stochastic, not stochastic)):
            qb = quantize(W1, sc, g, st, key=key, first=i0 * N)
            if j == 0:
                out.blocks[i0:i1] = qb
            moved = dequantize(qb, sc, g).double() - Wd
            sums[j] += torch.stack([(moved * delta).sum(), (delta * delta).sum(), ((moved - delta) ** 2).sum()])
    out.kept.add(Retention(*sums[0].tolist()))
    out.other.add(Retention(*sums[1].tolist()))
    return out
