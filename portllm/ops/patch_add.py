"""patch_add_: ``W[m, n] += B[m, r] · diag(s) · A[r, n]`` in place, the merge every workflow runs.

Math and rounding: the docstring of :func:`patch_add_`. Reference: ``portllm.reference.patch_add_``.
Kernels: ``csrc/cpu/patch_add.cpp`` (AVX2 / AVX-512 / AVX-512 BF16 paths), ``csrc/cuda/patch_add.cu``,
``kernels/patch_add.py`` (Triton). Tests: ``tests/test_patch_add*.py``. Benchmark:
``benchmarks/bench_patch_add.py``.
"""

from __future__ import annotations

import torch

from portllm import _ext, finite, reference
from portllm.ops import registry
from portllm.ops.checks import FLOAT_DTYPES, overlaps_itself, shares_memory


def patch_add_(
    W: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    *,
    backend: str | None = None,
    check_finite: bool | None = None,
) -> torch.Tensor:
    """W[m, n] += B[m, r] · diag(scale) · A[r, n], in place; returns W.

    * ``scale``: a number, or a tensor of r values (one per rank). Several patches merge in one
      pass by concatenating their factors, ``B = [B1 B2]``, ``A = [A1; A2]``, ``scale = [s1…, s2…]``.
    * Dtypes: W bfloat16, float16 or float32; B and A any of those (each its own). Every element
      is one rounding (to nearest even) to W's dtype of an fp32 sum: W plus the rank products,
      accumulated in fp32; the m×n product is never materialised. Ranks that share a scale form a
      group (one group per concatenated patch): the reference and the fp32-factor paths compute
      ``W + Σ_k fp32(B[i,k]·s_k)·A[k,j]``; the paths that multiply bf16/fp16 factors on
      dot-product units (the CPU's AVX512-BF16, tensor cores) compute ``W + Σ_g s_g·(Σ_{k∈g}
      B[i,k]·A[k,j])``, whose products are exact in fp32. Both are within the fp32 dot-product
      error bound of the exact result. fp32 factors on a bf16/fp16 W go to the tensor cores
      (Triton) as bf16 high and low parts of B·s and A (``Bh·Ah + Bh·Al + Bl·Ah``): each product
      within 2⁻¹⁶ of its fp32 value, far below W's rounding step. An fp32 W is always merged with
      fp32 products.
    * W may be strided: a row or column slice of a larger weight (a fused qkv), or transposed. Its
      elements must not overlap in memory (an expanded or ``as_strided`` view is refused).
    * Factors that share memory with W are read before W is written (here, for every backend).
    * Deterministic: the same inputs give the same bits, run after run.
    * ``backend``: see ``portllm.ops.registry``. ``check_finite=True`` (or ``PORTLLM_CHECK_FINITE=1``)
      first checks B, A and scale for NaN/Inf and raises ``ValueError`` naming the tensor; it is
      off by default because it reads the factors once more and synchronises with the device
      (``portllm.merge.merge_into``, which the workflows use, checks factors and the result).
    * Not differentiable: W is treated as data (it may be an ``nn.Parameter``; autograd does not
      record the update). Factors that require grad are refused while grad mode is on.
    """
    r = _check_patch_add_args(W, B, A)
    s = _scale_vector(scale, r, W.device)
    name, B, A = prepare(W, B, A, s, backend, check_finite, "patch_add_")
    if W.numel() == 0 or r == 0:
        return W
    with torch.no_grad():
        registry.run("patch_add_", name, W, B, A, s)
    return W


def prepare(W, B, A, s, backend, check_finite, what: str):
    """What every merge op does once its shapes are checked: the factors' NaN/Inf check (if asked),
    the refusal of factors that require grad, the backend, and copies of factors that alias W. Returns
    (backend name, B, A)."""
    if finite.enabled(check_finite):
        finite.check_factors(B, A, s, what)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (B, A, s)):
        raise RuntimeError(f"{what} is not differentiable: call it under torch.no_grad() or detach the factors")
    name = registry.resolve_backend(backend, W.device, "patch_add_")
    # The one place that keeps the promise "factors that alias W are read before W is written":
    # every backend then reads factors that no write to W can change.
    B = B.clone() if shares_memory(B, W) else B
    A = A.clone() if shares_memory(A, W) else A
    return name, B, A


def _check_patch_add_args(W, B, A) -> int:
    for name, t in (("W", W), ("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"patch_add_: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"patch_add_: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"patch_add_: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    (m, n), (mb, r), (ra, na) = W.shape, B.shape, A.shape
    if mb != m or na != n or ra != r:
        raise ValueError(
            f"patch_add_: shapes do not match: W {tuple(W.shape)}, B {tuple(B.shape)}, "
            f"A {tuple(A.shape)} (need W [m, n], B [m, r], A [r, n])"
        )
    for name, t in (("B", B), ("A", A)):
        if t.device != W.device:
            raise ValueError(f"patch_add_: {name} is on {t.device} but W is on {W.device}")
    if overlaps_itself(W):
        raise ValueError(
            f"patch_add_: W (shape {tuple(W.shape)}, stride {W.stride()}) has elements that share "
            "memory (an expanded or as_strided view); an in-place update would be wrong. Pass W.clone()."
        )
    return r


def _scale_vector(scale, r: int, device: torch.device) -> torch.Tensor:
    """scale as the float32 [r] tensor the kernels take."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"patch_add_: scale has dtype {scale.dtype}; give a float or a float tensor")
        if scale.dim() == 0:
            return scale.to(device=device, dtype=torch.float32).expand(r).contiguous()
        if scale.shape != (r,):
            raise ValueError(f"patch_add_: scale must be a number or have shape ({r},) (one per rank), "
                             f"got shape {tuple(scale.shape)}")
        return scale.to(device=device, dtype=torch.float32).contiguous()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"patch_add_: scale must be a number or a tensor, got {type(scale).__name__}")
    return torch.full((r,), float(scale), dtype=torch.float32, device=device)


def _triton(W, B, A, s):
    torch.ops.portllm.patch_add_triton_(W, B, A, s)


@torch.library.custom_op("portllm::patch_add_triton_", mutates_args=("W",))
def _patch_add_triton(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    from portllm.kernels.patch_add import patch_add_forward

    patch_add_forward(W, B, A, scale)


@_patch_add_triton.register_fake
def _patch_add_triton_fake(W, B, A, scale) -> None:
    return None


if _ext.available():

    @torch.library.register_fake("portllm::patch_add_")
    def _patch_add_fake(W, B, A, scale) -> None:
        return None


registry.register("patch_add_", *registry.standard_impls(
    "patch_add_", source="patch_add", kernel="patch_add_forward",
    reference=lambda W, B, A, s: reference.patch_add_(W, B, A, s),
    extension=lambda W, B, A, s: torch.ops.portllm.patch_add_(W, B, A, s),
    triton=_triton))
