"""mxfp4_merge: a patch merged into one expert's MXFP4 weight, block by block: dequantize, add s·B·A,
keep or recompute the block's e8m0 scale, requantize onto the e2m1 grid (nearest even or stochastic),
and the sums that say how much of the update survived, for both roundings.

Math: ``portllm.mxfp4`` (module docstring). Reference: ``portllm.reference.mxfp4_merge`` (PyTorch, band
by band). Kernel: ``csrc/cpu/mxfp4_merge.cpp`` (one pass over the packed weight, every output bit the
reference's). Used by ``portllm.mxfp4.merge_`` (the port into MXFP4 checkpoints). Tests:
``tests/test_mxfp4.py``. Benchmark: ``benchmarks/bench_mxfp4.py``.
"""

from __future__ import annotations

import torch

from portllm import _ext, reference
from portllm.ops import registry


def mxfp4_merge(blocks: torch.Tensor, scales: torch.Tensor, Bs: torch.Tensor, A: torch.Tensor, *, fresh: bool = False,
                stochastic: bool = False, key: int = 0, first: int = 0, backend: str | None = None):
    """(blocks', scales', sums, clipped) for W' = dequantize(blocks, scales) + Bs·A, requantized.

    blocks: uint8 [R, G, 16] (two e2m1 codes a byte, element 2j low); scales: uint8 [R, G] (e8m0 bytes,
    checked by the caller, ``mxfp4.check``); Bs float32 [R, r] (B·diag(s)); A float32 [r, G·32].
    ``fresh``: every block's scale as the format's quantizer computes it; else each block keeps its
    byte where the merged values fit, and takes the fresh one where not (``clipped`` bool [R, G]).
    ``stochastic``: the rounding written (the other's sums are returned too), from 20 random bits per
    element, a hash of ``key`` (``fp8.stream_key``) and the flat index ``first`` + row·G·32 + column.
    ``sums``: float64 [2, 3], ⟨Q−W, Δ⟩, ‖Δ‖², ‖Q−W−Δ‖² for the rounding asked for, then the other.
    Nothing is modified."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[2] != 16:
        raise TypeError(f"mxfp4_merge: blocks must be uint8 [rows, blocks, 16], got {blocks.dtype} "
                        f"{tuple(blocks.shape)}")
    R, G, _ = blocks.shape
    if scales.dtype != torch.uint8 or tuple(scales.shape) != (R, G):
        raise ValueError(f"mxfp4_merge: scales must be uint8 {(R, G)}, got {scales.dtype} {tuple(scales.shape)}")
    r = Bs.shape[1] if Bs.dim() == 2 else -1
    if Bs.dim() != 2 or A.dim() != 2 or Bs.shape[0] != R or tuple(A.shape) != (r, G * 32):
        raise ValueError(f"mxfp4_merge: shapes do not match: blocks {tuple(blocks.shape)} ({R}x{G * 32}), "
                         f"Bs {tuple(Bs.shape)}, A {tuple(A.shape)} (need Bs [R, r], A [r, {G * 32}])")
    if Bs.dtype != torch.float32 or A.dtype != torch.float32:
        raise TypeError(f"mxfp4_merge: Bs and A must be float32, got {Bs.dtype} and {A.dtype}")
    name = registry.resolve_backend(backend, blocks.device, "mxfp4_merge")
    return registry.run("mxfp4_merge", name, blocks.contiguous(), scales.contiguous(), Bs.contiguous(),
                        A.contiguous(), bool(fresh), bool(stochastic), int(key) & ((1 << 64) - 1), int(first))


def _signed64(key: int) -> int:
    return key - (1 << 64) if key >= 1 << 63 else key


def _cpp(blocks, scales, Bs, A, fresh, stochastic, key, first):
    return torch.ops.portllm.mxfp4_merge(blocks, scales, Bs, A, fresh, stochastic, _signed64(key), first)


if _ext.has_kernel("mxfp4_merge", "CPU"):

    @torch.library.register_fake("portllm::mxfp4_merge")
    def _mxfp4_merge_fake(blocks, scales, Bs, A, fresh, stochastic, key, first):
        return (torch.empty_like(blocks), torch.empty_like(scales), Bs.new_empty((2, 3), dtype=torch.float64),
                torch.empty(scales.shape, dtype=torch.bool, device=scales.device))


registry.register("mxfp4_merge", *registry.standard_impls(
    "mxfp4_merge", source="mxfp4_merge", triton=None, extension_devices=("cpu",),
    reference=reference.mxfp4_merge, extension=_cpp))
