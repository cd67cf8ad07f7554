"""Merging a patch into a block-scaled FP8 weight: dequantize, add s·B·A in fp32, requantize, and say how
much of the update survived.

The format (DeepSeek-V3, the Qwen3 FP8 releases; transformers' ``quant_method: "fp8"`` with
``weight_block_size`` [bm, bn]): ``weight`` float8_e4m3fn [M, N] and ``weight_scale_inv`` float32
[ceil(M/bm), ceil(N/bn)], the dequantized weight being ``W = float(q) · scale_inv[i // bm, j // bn]``
(in fp32, rounded as transformers' dequantization rounds it).

The merge, per band of bm rows (no M×N temporary beyond a band):

    W  = dequantize(q, scale_inv)                      fp32
    W' = W + B·diag(s)·A                               float64 accumulation, rounded once to fp32
    scale = 448 / amax_block(|W'|)                     the block's new scale, as transformers' quantizer
    q' = Q(clamp(W' · scale, ±448)), scale_inv' = 1/scale    computes them; Q to e4m3: nearest even (``nearest``), or
                                                       ``stochastic``: up or down with probabilities that
                                                       make E[Q(x)] = x, from a counter-based hash of the
                                                       seed and the element's index (``random_bits``)

e4m3 keeps 3 mantissa bits: an update of about 1% of a weight is below half a step for most elements,
and round-to-nearest erases it. So the merge measures, over the whole weight, what survived:

    retained = ⟨Q(W') − W, Δ⟩ / ‖Δ‖²          noise = ‖Q(W') − W − Δ‖ / ‖Δ‖          (Δ = W' − W)

where Q(W') is the dequantized result. Stochastic rounding keeps the update in expectation (retained
near 1, with noise); nearest keeps what crosses a rounding boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
ROUNDINGS = ("nearest", "stochastic")


class FP8FormatError(ValueError):
    """An FP8 weight or scale that does not fit the format; the message names the tensor."""


@dataclass
class Retention:
    """Sums over the elements merged so far: ⟨Q−W, Δ⟩, ‖Δ‖², ‖Q−W−Δ‖² (float64)."""

    dot: float = 0.0
    delta2: float = 0.0
    noise2: float = 0.0

    def add(self, other: "Retention"):
        self.dot += other.dot
        self.delta2 += other.delta2
        self.noise2 += other.noise2

    @property
    def retained(self) -> float:
        return self.dot / self.delta2 if self.delta2 > 0 else 1.0

    @property
    def noise(self) -> float:
        return (self.noise2 / self.delta2) ** 0.5 if self.delta2 > 0 else 0.0


def check_block_scales(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str):
    """FP8FormatError naming ``name`` unless q is a 2-D e4m3 weight and scale_inv its float32 block scales,
    finite and positive, of shape [ceil(M/bm), ceil(N/bn)]."""
    if q.dtype != E4M3 or q.dim() != 2:
        raise FP8FormatError(f"tensor {name}: expected a 2-D float8_e4m3fn weight, got {q.dtype} {tuple(q.shape)}")
    bm, bn = block
    want = (-(-q.shape[0] // bm), -(-q.shape[1] // bn))
    if tuple(scale_inv.shape) != want:
        raise FP8FormatError(f"tensor {name}_scale_inv: shape {tuple(scale_inv.shape)} does not match the weight "
                             f"{tuple(q.shape)} in blocks of {bm}x{bn} (expected {want})")
    if scale_inv.dtype not in (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32)):
        raise FP8FormatError(f"tensor {name}_scale_inv: dtype {scale_inv.dtype}; portllm writes block scales as "
                             "float32 (or float8_e8m0fnu powers of two), which a narrower float would round")
    s = scale_inv.float()
    bad = int((~torch.isfinite(s) | (s <= 0)).sum())
    if bad:
        raise FP8FormatError(f"tensor {name}_scale_inv: {bad} of {s.numel()} block scales are not finite and "
                             "positive")


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    return scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float(q) · scale_inv per block, in fp32 (one rounding of the product, as transformers dequantizes)."""
    return q.float() * _expand(scale_inv.float(), q.shape[0], q.shape[1], block)


_M32 = 0xFFFFFFFF


def _fmix32(h):
    """MurmurHash3's 32-bit finalizer, on Python ints or int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stream_key(seed: int) -> int:
    """The 64-bit key of stochastic rounding's stream for ``seed`` (any integer): two mixed 32-bit words."""
    seed &= (1 << 64) - 1
    return (_fmix32(((seed >> 32) & _M32) ^ 0x85EBCA6B) << 32) | _fmix32((seed & _M32) ^ 0x9E3779B9)


def random_bits(index: torch.Tensor, key: int) -> torch.Tensor:
    """20 uniform random bits per element (int64 in [0, 2^20)), a hash of ``key`` and the element's flat
    index (int64 tensor): h = fmix32(fmix32(index_lo ^ key_lo) ^ index_hi ^ key_hi) >> 12. The C++ kernel
    (``csrc/cpu/fp8_merge.cpp``) computes the same bits."""
    lo, hi = key & _M32, (key >> 32) & _M32
    h = _fmix32((index & _M32) ^ lo)
    h = _fmix32(h ^ ((index >> 32) & _M32) ^ hi)
    return h >> 12


def round_e4m3(x: torch.Tensor, rounding: str = "nearest", *, key: int = 0,
               index: torch.Tensor | None = None) -> torch.Tensor:
    """x (fp32) clamped to ±448, to e4m3: to nearest even, or stochastically (E[result] = x): 20 random
    bits (``random_bits(index, key)``; index defaults to the flat positions of x) added below the 3
    kept mantissa bits, then truncated (below 2^-6, on the subnormal grid of 2^-9: floor(|x|·512 + u))."""
    x = x.clamp(-E4M3_MAX, E4M3_MAX)
    if rounding == "nearest":
        return x.to(E4M3)
    if index is None:
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).reshape(x.shape)
    u = random_bits(index, key)
    a = x.abs()
    normal = ((a.view(torch.int32).to(torch.int64) + u) & ~0xFFFFF).to(torch.int32).view(torch.float32)
    sub = torch.floor(a * 512 + u.to(torch.float32) * 2.0 ** -20) / 512
    return torch.copysign(torch.where(a >= 2.0 ** -6, normal, sub), x).to(E4M3)


def quantize(W: torch.Tensor, block: tuple[int, int], rounding: str = "nearest", *, key: int = 0,
             first_row: int = 0, scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 W [M, N] -> (q e4m3 [M, N], scale_inv fp32 [ceil(M/bm), ceil(N/bn)]), as transformers' FP8
    quantizer computes them (``integrations/finegrained_fp8.py``, ``Fp8Quantize``): per block, in fp32,
    scale = 448 / amax (1 for a block of zeros), q = Q(clamp(W · scale, ±448)), scale_inv = 1 / scale.
    Stochastic rounding draws from ``key`` at the flat index of each element in a weight whose row 0
    is W's row ``first_row`` (a band of a larger weight rounds as that weight does)."""
    bm, bn = block
    M, N = W.shape
    pad = torch.nn.functional.pad(W.abs(), (0, (-N) % bn, 0, (-M) % bm))
    amax = pad.reshape(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))
    scale = torch.where(amax > 0, E4M3_MAX / amax, torch.ones_like(amax))
    inv = (1.0 / scale).float()
    if scale_fmt == "ue8m0":  # power-of-two scales: the inverse rounded up, the forward scale its exact reciprocal
        inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
        scale = 1.0 / inv
    index = None
    if rounding == "stochastic":
        index = (torch.arange(first_row, first_row + M, dtype=torch.int64, device=W.device)[:, None] * N
                 + torch.arange(N, dtype=torch.int64, device=W.device)[None, :])
    q = round_e4m3(W * _expand(scale, M, N, block), rounding, key=key, index=index)
    return q, inv


def merge_(q: torch.Tensor, scale_inv: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor,
           block: tuple[int, int], *, rounding: str = "nearest", seed: int = 0, backend: str | None = None,
           scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor, Retention]:
    """The block-FP8 merge (module docstring): returns the new (q, scale_inv) and the retention sums.
    q, scale_inv are not modified. ``seed`` makes stochastic rounding deterministic (``stream_key``).
    ``ops.fp8_merge`` on its backend (the C++ kernel on CPUs, the same bits as the reference); ue8m0
    scales, whose rounding follows torch's log2 as transformers' quantizer does, take the reference
    (``reference.fp8_merge`` with ``scale_fmt``: the same sum, power-of-two scales)."""
    from portllm import ops

    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    key = stream_key(seed)
    if scale_inv.dtype == getattr(torch, "float8_e8m0fnu", None):
        scale_fmt = "ue8m0"  # (scales stored as powers of two are recomputed as powers of two)
    if scale_fmt == "float":
        out_q, out_s, sums = ops.fp8_merge(q, scale_inv, B, A, s, block, stochastic=rounding == "stochastic",
                                           key=key, backend=backend)
    else:
        from portllm import reference

        out_q, out_s, sums = reference.fp8_merge(q, scale_inv.float(), (B.float() * s.float()[None, :]).contiguous(),
                                                 A.float(), block, rounding == "stochastic", key, scale_fmt)
    dot, d2, n2 = sums.tolist()
    return out_q, out_s.to(scale_inv.dtype), Retention(dot, d2, n2)
