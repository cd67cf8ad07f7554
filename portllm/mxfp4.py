"""Merging a patch into MXFP4 weights (GPT-OSS's experts): dequantize, add s·B·A, requantize onto the
e2m1 grid, and say how much of the update survived.

The layout, as transformers reads it (``integrations/mxfp4.py``, ``convert_moe_packed_tensors``, what
``from_pretrained`` runs to dequantize on a CPU), for an expert parameter ``P`` held in memory as
[E, K, R] (GPT-OSS's experts, [experts, in, out]):

    P_blocks  uint8 [E, R, G, 16]   R output rows; G = K/32 blocks of 32 inputs, 16 bytes each holding
                                    two e2m1 codes: element 2j in the low nibble, 2j+1 in the high one
    P_scales  uint8 [E, R, G]       the block's scale 2^(byte − 127) (e8m0; 255 is NaN)
    P[e] = (e2m1(codes) · scale).T  a code's bit 3 is its sign, bits 0–2 index 0, .5, 1, 1.5, 2, 3, 4, 6

so the stored expert is [out, in] and PEFT's update B_e·A_e lands on it untransposed.

The merge, expert by expert (W = dequantized [R, K], exact in fp32):

    W' = float32(float64(W) + Σ_k float64(Bs[:, k])·float64(A[k]))     k ascending, as the FP8 merge
    scales, by ``policy``:
      "reuse"  each block keeps its byte; a block with some |W'| ≥ 7·2^(byte−127) does not fit (nearest
               rounding on the grid extended by its next step, 8, would leave the grid), and gets the
               scale "fresh" would give it (``on_clip="rescale"``, counted in the result) or is refused
               (``on_clip="refuse"``, naming the block). Values in (6, 7) saturate at 6, as nearest
               rounding would round them anyway; rescaling a block for them would re-round all 32 of
               its elements on a grid twice as coarse
      "fresh"  every block's scale as the format's own quantizer computes it (triton_kernels'
               ``downcast_to_mxfp_torch``, which transformers calls): d = amax/6 in fp32, rounded up to
               a power of two on its bits ((bits + 0x7FFFFF) & 0x7F800000); the byte is d's exponent field
    codes: x = W'·2^(127 − byte) (exact, in float64) onto the e2m1 grid, saturating at ±6:
      "nearest"     nearest, ties to the even code (IEEE and the OCP MX spec's conversion; triton_kernels'
                    torch quantizer sends exact ties away from zero instead, the only difference)
      "stochastic"  between grid points g ≤ |x| < g', up with probability floor(2^20·(|x|−g)/(g'−g))/2^20,
                    from 20 random bits per element (``fp8.random_bits``: the stream key and the element's
                    flat index in the tensor), so E[Q(x)] = x to within 2^-20 of a step (but for
                    values in (6, 7) under "reuse", which saturate at 6 with either rounding)
    the sign bit is x's sign bit (−0.1 gives code 8, −0), as triton_kernels' quantizer sets it.

e2m1 keeps one mantissa bit: a grid step is 25–50% of the block's largest value, and round-to-nearest
erases an update of 1% almost everywhere. So the merge measures what survived, over the whole weight,
for the rounding used and for the other one (what the report offers instead):

    retained = ⟨Q(W') − W, Δ⟩ / ‖Δ‖²          noise = ‖Q(W') − W − Δ‖ / ‖Δ‖          (Δ = W' − W)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from portllm.fp8 import FP8FormatError, Retention, random_bits, stream_key

GROUP = 32
E2M1_MAX = 6.0
CLIP = 7.0  # (see "reuse" above)
VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
POLICIES = ("reuse", "fresh")
ON_CLIP = ("rescale", "refuse")
NAN_SCALE = 255
MAX_SCALE = 252  # 6·2^(252−127) < 2^128: the largest byte whose every code is finite in fp32 and bf16


class MXFP4FormatError(FP8FormatError):
    """An MXFP4 tensor or setting portllm cannot merge into; the message names the tensor or field."""


class ClippedBlockError(ValueError):
    """A block whose merged values do not fit its scale, with ``on_clip="refuse"``; names the block."""


def check(name: str, blocks_shape, blocks_dtype, scales: torch.Tensor):
    """MXFP4FormatError naming the tensor unless ``name``_blocks is uint8 [E, R, G, 16] and ``name``_scales
    uint8 [E, R, G] with every byte at most MAX_SCALE (255 is NaN; above 252 codes overflow float32)."""
    shape = tuple(blocks_shape)
    if blocks_dtype != torch.uint8 or len(shape) != 4 or shape[-1] != GROUP // 2 or 0 in shape:
        raise MXFP4FormatError(f"tensor {name}_blocks: expected uint8 [experts, rows, blocks, 16] (two e2m1 codes a "
                               f"byte, 32 per block), got {blocks_dtype} {shape}")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != shape[:3]:
        raise MXFP4FormatError(f"tensor {name}_scales: expected uint8 {shape[:3]} (one e8m0 scale per block of "
                               f"{name}_blocks {shape}), got {scales.dtype} {tuple(scales.shape)}")
    bad = int((scales == NAN_SCALE).sum())
    if bad:
        raise MXFP4FormatError(f"tensor {name}_scales: {bad} of {scales.numel()} block scales are NaN (e8m0 byte 255)")
    huge = int((scales >= MAX_SCALE + 1).sum())
    if huge:
        raise MXFP4FormatError(f"tensor {name}_scales: {huge} of {scales.numel()} block scales are 2^126 or more (byte "
                               f"> {MAX_SCALE}), where e2m1 codes overflow float32 as transformers dequantizes them")


def _lut(device) -> torch.Tensor:
    v = torch.tensor(VALUES, dtype=torch.float64, device=device)
    return torch.cat([v, -v])


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., R, G, 16] codes and [..., R, G] bytes -> float32 [..., R, G·32], as stored ([out, in]): exact
    (every value is e2m1 · 2^(byte − 127), representable in fp32 and in bf16)."""
    lut = _lut(blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0xF], lut[b >> 4]], dim=-1).flatten(-2)  # [..., R, G, 32]
    out = vals * torch.pow(2.0, scales.to(torch.float64) - 127)[..., None]
    return out.flatten(-2).float()


def fresh_scales(W: torch.Tensor) -> torch.Tensor:
    """The format's own scale bytes for fp32 W [R, K] (K a multiple of 32): d = amax/6 in fp32, rounded
    up to a power of two on its bits; the byte is its exponent field (0 for a block of zeros)."""
    amax = W.reshape(W.shape[0], -1, GROUP).abs().amax(-1)
    d = (amax / E2M1_MAX).view(torch.int32).to(torch.int64)
    return (((d + 0x7FFFFF) & 0x7F800000) >> 23).to(torch.uint8)


_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def round_e2m1(x: torch.Tensor, stochastic: bool = False, *, key: int = 0,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """x (float64, already divided by its block's scale) -> e2m1 codes (int64 0..15), saturating at ±6:
    nearest with ties to the even code, or stochastic from ``random_bits(index, key)``."""
    a = x.abs().contiguous()
    if not stochastic:
        mids = torch.tensor(_MIDS, dtype=torch.float64, device=x.device)
        lo, hi = torch.bucketize(a, mids), torch.bucketize(a, mids, right=True)
        mag = torch.where(lo % 2 == 0, lo, hi)  # equal unless a tie: then the even code
    else:
        grid = torch.tensor(VALUES + (8.0,), dtype=torch.float64, device=x.device)
        low = (torch.bucketize(a, grid, right=True) - 1).clamp(0, 7)
        step = grid[(low + 1).clamp(max=7)] - grid[low]
        frac = torch.where(low < 7, (a - grid[low]) / torch.where(low < 7, step, 1.0), 0.0)
        if index is None:
            index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
        t = torch.floor(frac * 2.0 ** 20).to(torch.int64)
        mag = low + ((t + random_bits(index, key)) >= (1 << 20)).to(torch.int64)
    return mag.clamp(max=7) | (torch.signbit(x).to(torch.int64) << 3)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int64 codes [..., K] -> uint8 [..., K/32, 16]: element 2j in the low nibble."""
    c = codes.reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).reshape(*codes.shape[:-1], -1, GROUP // 2)


def quantize(W: torch.Tensor, scales: torch.Tensor, stochastic: bool = False, *, key: int = 0,
             first: int = 0) -> torch.Tensor:
    """fp32 W [R, K] on the given scale bytes [R, K/32] -> blocks [R, K/32, 16]; stochastic rounding draws
    at flat index ``first`` + row·K + column."""
    R, K = W.shape
    x = W.double().reshape(R, -1, GROUP) * torch.pow(2.0, 127 - scales.to(torch.float64))[..., None]
    index = None
    if stochastic:
        index = first + torch.arange(R * K, dtype=torch.int64, device=W.device).reshape(R, -1, GROUP)
    return pack(round_e2m1(x, stochastic, key=key, index=index).reshape(R, K))


@dataclass
class MergeResult:
    """One tensor's merge: the new blocks and scales, the sums for the rounding used (``kept``) and for
    the other one (``other``), and the blocks given a fresh scale because they did not fit (flat
    indices into the scales, in order)."""

    blocks: torch.Tensor
    scales: torch.Tensor
    kept: Retention = field(default_factory=Retention)
    other: Retention = field(default_factory=Retention)
    rescaled: list[int] = field(default_factory=list)
    rescaled_count: int = 0


def merge_(blocks: torch.Tensor, scales: torch.Tensor, factors, *, policy: str = "reuse",
           on_clip: str = "rescale", rounding: str = "nearest", seed: int = 0, backend: str | None = None,
           name: str = "weight", first_expert: int = 0) -> MergeResult:
    """The MXFP4 merge (module docstring) of one parameter's experts: ``blocks`` [E, R, G, 16] and
    ``scales`` [E, R, G] (not modified), ``factors`` {expert: (B [R, r], A [r, K], s)}. Experts without
    factors are copied. ``seed`` makes stochastic rounding deterministic (``fp8.stream_key``); the flat
    index of an element is its place in the [E, R, K] tensor. ``first_expert``: the tensors are experts
    ``first_expert``... of a larger one (a chunk: indices, names and streams are the whole tensor's).
    Runs ``ops.mxfp4_merge`` on ``backend``."""
    from portllm import ops

    if policy not in POLICIES:
        raise ValueError(f"MXFP4 scale policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if on_clip not in ON_CLIP:
        raise ValueError(f"on_clip must be one of {', '.join(ON_CLIP)}, got {on_clip!r}")
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be nearest or stochastic, got {rounding!r}")
    E, R, G, _ = blocks.shape
    K = G * GROUP
    out = MergeResult(blocks.clone(), scales.clone())
    key = stream_key(seed)
    for e in sorted(factors):
        B, A, s = factors[e]
        Bs = (B.to(torch.float32) * torch.as_tensor(s, dtype=torch.float32)).contiguous()
        q2, s2, sums, clipped = ops.mxfp4_merge(blocks[e], scales[e], Bs, A.to(torch.float32), fresh=policy == "fresh",
                                                stochastic=rounding == "stochastic", key=key,
                                                first=(first_expert + e) * R * K,
                                                backend=backend)
        if not all(math.isfinite(v) for v in sums.reshape(-1).tolist()) or bool((s2 > MAX_SCALE).any()):
            from portllm.merge import NonFiniteMergeError

            raise NonFiniteMergeError(f"tensor {name}_blocks, expert {first_expert + e}: the merged weight has NaN or "
                                      f"Inf values, or values beyond what MXFP4 holds finite (a scale above "
                                      f"2^{MAX_SCALE - 127}); nothing written")
        n = int(clipped.sum())
        if n:
            where = clipped.reshape(-1).nonzero()[:, 0]
            if on_clip == "refuse":
                r0, g0 = divmod(int(where[0]), G)
                raise ClippedBlockError(
                    f"tensor {name}_blocks: {n} block(s) of expert {first_expert + e} do not fit their scale after "
                    f"the merge "
                    f"(first: row {r0}, columns {g0 * GROUP}:{(g0 + 1) * GROUP}, "
                    f"scale 2^{int(scales[e, r0, g0]) - 127}); "
                    "nothing written; let them be rescaled (on_clip='rescale') or use policy 'fresh'")
            out.rescaled += (where[:max(0, 8 - len(out.rescaled))] + (first_expert + e) * R * G).tolist()  # (named)
            out.rescaled_count += n
        out.blocks[e], out.scales[e] = q2, s2
        out.kept.add(Retention(*sums[0].tolist()))
        out.other.add(Retention(*sums[1].tolist()))
    return out
