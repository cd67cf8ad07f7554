"""skeleton_mm: products with a skeleton of W (columns or rows gathered by index), never copied (PMSS).

Math: the docstring of :func:`skeleton_mm`. Reference: ``portllm.reference.skeleton_mm``. Kernels:
``csrc/cpu/skeleton_mm.cpp``, ``csrc/cuda/skeleton_mm.cu``, ``kernels/skeleton_mm.py`` (Triton). Used by
``portllm.pmss.layer``. Tests: ``tests/test_pmss_ops.py``. Benchmark: ``benchmarks/bench_pmss.py``.
"""

from __future__ import annotations

import os

import torch

from portllm import _ext, reference
from portllm.ops import registry
from portllm.ops.registry import BackendUnavailableError
from portllm.ops.checks import FLOAT_DTYPES

_SKELETON_KINDS = ("ct", "c", "r")


def skeleton_mm(A: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, kind: str, *,
                backend: str | None = None) -> torch.Tensor:
    """Products with a skeleton of W [m, n] gathered by ``idx`` (int64, on W's device), never
    copied: ``"ct"``: A [T, r] @ W[:, idx]ᵀ -> [T, m]; ``"c"``: A [T, m] @ W[:, idx] -> [T, r];
    ``"r"``: A [T, r] @ W[idx, :] -> [T, n]. Result in A's dtype, fp32 accumulation. Differentiable
    only through ``portllm.pmss`` (its autograd function composes these)."""
    if kind not in _SKELETON_KINDS:
        raise ValueError(f"skeleton_mm: unknown kind {kind!r}; choose one of {', '.join(_SKELETON_KINDS)}")
    for name, t in (("A", A), ("W", W)):
        if t.dim() != 2:
            raise ValueError(f"skeleton_mm: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"skeleton_mm: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16 "
                            "(float64 on the reference and cpp backends)")
    if idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"skeleton_mm: idx must be a 1-D int64/int32 tensor, got {idx.dtype} {tuple(idx.shape)}")
    m, n = W.shape
    need_k = {"ct": idx.numel(), "c": m, "r": idx.numel()}[kind]
    if A.shape[1] != need_k:
        raise ValueError(f"skeleton_mm({kind!r}): A {tuple(A.shape)} needs {need_k} columns for W {tuple(W.shape)} "
                         f"and {idx.numel()} indices")
    for name, t in (("A", A), ("idx", idx)):
        if t.device != W.device:
            raise ValueError(f"skeleton_mm: {name} is on {t.device} but W is on {W.device}")
    idx = idx.to(torch.int64)
    name = resolve_skeleton_backend(backend, A, W)
    return registry.run("skeleton_mm", name, A, W, idx, kind)


def resolve_skeleton_backend(backend: str | None, A: torch.Tensor, W: torch.Tensor) -> str:
    """The backend skeleton products of A and W run on: float64 (gradcheck) runs on the reference
    unless a backend is named, and is refused by the GPU backends."""
    fp64 = torch.float64 in (A.dtype, W.dtype)
    if fp64 and backend is None and os.environ.get("PORTLLM_BACKEND") in (None, "", "auto"):
        backend = "reference"
    name = registry.resolve_backend(backend, W.device, "skeleton_mm")
    if fp64 and name in ("triton", "cuda"):
        raise BackendUnavailableError(f"portllm backend {name!r} does not take float64 tensors")
    return name


def _n_out(A, W, idx, kind) -> int:
    return {"ct": W.shape[0], "c": idx.shape[0], "r": W.shape[1]}[kind]


@torch.library.custom_op("portllm::skeleton_mm_triton", mutates_args=())
def _skeleton_mm_triton(A: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    from portllm.kernels.skeleton_mm import skeleton_mm_forward

    return skeleton_mm_forward(A, W, idx, kind)


@_skeleton_mm_triton.register_fake
def _skeleton_mm_triton_fake(A, W, idx, kind):
    return A.new_empty(A.shape[0], _n_out(A, W, idx, kind))


if _ext.has_kernel("skeleton_mm", "CPU"):

    @torch.library.register_fake("portllm::skeleton_mm")
    def _skeleton_mm_fake(A, W, idx, kind):
        return A.new_empty(A.shape[0], _n_out(A, W, idx, kind))


registry.register("skeleton_mm", *registry.standard_impls(
    "skeleton_mm", source="skeleton_mm", kernel="skeleton_mm_forward",
    reference=lambda A, W, idx, kind: reference.skeleton_mm(A, W, idx, kind),
    extension=lambda A, W, idx, kind: torch.ops.portllm.skeleton_mm(A, W, idx, kind),
    triton=lambda A, W, idx, kind: torch.ops.portllm.skeleton_mm_triton(A, W, idx, kind)))
