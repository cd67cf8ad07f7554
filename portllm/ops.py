"""portllm's ops: one Python entry per op, with argument checks and backend dispatch.

Every op has a table of its implementations, one per backend (``IMPLEMENTATIONS`` below, printed
by ``portllm info``): where the code lives, which devices it runs on, and how to tell whether it is
present in this installation. The backends:

=========== ======================================================= =============================
name        what                                                    runs on
=========== ======================================================= =============================
reference   pure PyTorch (``portllm.reference``), the oracle        any device
cpp         C++ kernels of ``portllm._C`` (``csrc/cpu``)            CPU tensors
cuda        CUDA kernels of ``portllm._C`` (``csrc/cuda``)          CUDA tensors
triton      Triton kernels (``kernels/``, as ``portllm.kernels``)   CUDA tensors; CPU tensors
                                                                    under ``TRITON_INTERPRET=1``
=========== ======================================================= =============================

The backend is the ``backend=`` argument, else the ``PORTLLM_BACKEND`` environment variable, else
the op's default for the device: the order in ``portllm.defaults``, which is generated from the
committed benchmark results (fastest measured first; never a backend measured slower than the
reference). A backend asked for by name that cannot run raises :class:`BackendUnavailableError`;
there is no silent fallback.

This is the only module that imports triton (lazily) or ``portllm._C``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from portllm import _ext, defaults, reference

BACKENDS = ("reference", "cpp", "cuda", "triton")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# The implementation tables


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    backend: str
    where: str  # the code: module.function, or source file and the torch op it registers
    devices: tuple[str, ...]  # device types it runs on
    run: Callable  # takes the op's checked arguments


def _ext_reason(op: str, key: str, backend: str, device: torch.device) -> str | None:
    if device.type != key.lower():
        kind = "CPU" if key == "CPU" else "CUDA"
        return f"backend {backend!r} runs on {kind} tensors, the tensors are on {device}"
    if not _ext.available():
        return f"the extension portllm._C is not loaded ({_ext.ERROR})"
    if not _ext.has_kernel(op, key):
        if key == "CUDA":
            why = _ext.cuda_kernels_missing() or "torch without CUDA or no CUDA toolkit at build time"
            return f"portllm._C was built without CUDA kernels for {op} ({why}; `portllm info` says more)"
        return f"this build of portllm._C has no {op} kernel; rebuild with `pip install --no-build-isolation -e .`"
    return None


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # (a file-system search: once per process)


def _triton_reason(device: torch.device) -> str | None:
    if not _triton_installed():
        return "triton is not installed (pip install 'portllm[triton]')"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1, set before triton is imported"
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not run on {device}"
    return None


def _unavailable(op: str, impl: Impl, device: torch.device) -> str | None:
    if impl.backend == "reference":
        return None
    if impl.backend == "triton":
        return _triton_reason(device)
    return _ext_reason(op, "CPU" if impl.backend == "cpp" else "CUDA", impl.backend, device)


def _patch_add_triton_run(W, B, A, s):
    torch.ops.portllm.patch_add_triton_(W, B, A, s)


def _skeleton_mm_triton_run(A, W, idx, kind):
    return torch.ops.portllm.skeleton_mm_triton(A, W, idx, kind)


def _lora_shrink_triton_run(x, A, slots, tiles=None):
    return torch.ops.portllm.lora_shrink_triton(x, A, slots, tiles)


def _lora_expand_triton_run(y, h, B, scale, slots, tiles=None):
    torch.ops.portllm.lora_expand_triton_(y, h, B, scale, slots, tiles)


IMPLEMENTATIONS: dict[str, dict[str, Impl]] = {
    "patch_add_": {
        "reference": Impl("reference", "portllm.reference.patch_add_", ("cpu", "cuda"),
                          lambda W, B, A, s: reference.patch_add_(W, B, A, s)),
        "cpp": Impl("cpp", "csrc/cpu/patch_add.cpp (torch.ops.portllm.patch_add_, CPU)", ("cpu",),
                    lambda W, B, A, s: torch.ops.portllm.patch_add_(W, B, A, s)),
        "cuda": Impl("cuda", "csrc/cuda/patch_add.cu (torch.ops.portllm.patch_add_, CUDA)", ("cuda",),
                     lambda W, B, A, s: torch.ops.portllm.patch_add_(W, B, A, s)),
        "triton": Impl("triton", "portllm.kernels.patch_add.patch_add_forward (torch.ops.portllm.patch_add_triton_)",
                       ("cpu", "cuda"), _patch_add_triton_run),
    },
    "skeleton_mm": {
        "reference": Impl("reference", "portllm.reference.skeleton_mm", ("cpu", "cuda"),
                          lambda A, W, idx, kind: reference.skeleton_mm(A, W, idx, kind)),
        "cpp": Impl("cpp", "csrc/cpu/skeleton_mm.cpp (torch.ops.portllm.skeleton_mm, CPU)", ("cpu",),
                    lambda A, W, idx, kind: torch.ops.portllm.skeleton_mm(A, W, idx, kind)),
        "cuda": Impl("cuda", "csrc/cuda/skeleton_mm.cu (torch.ops.portllm.skeleton_mm, CUDA)", ("cuda",),
                     lambda A, W, idx, kind: torch.ops.portllm.skeleton_mm(A, W, idx, kind)),
        "triton": Impl("triton", "portllm.kernels.skeleton_mm.skeleton_mm_forward "
                       "(torch.ops.portllm.skeleton_mm_triton)", ("cpu", "cuda"), _skeleton_mm_triton_run),
    },
    "lora_shrink": {
        "reference": Impl("reference", "portllm.reference.lora_shrink", ("cpu", "cuda"),
                          lambda x, A, slots, tiles=None: reference.lora_shrink(x, A, slots)),
        "cpp": Impl("cpp", "csrc/cpu/lora_shrink.cpp (torch.ops.portllm.lora_shrink, CPU)", ("cpu",),
                    lambda x, A, slots, tiles=None: torch.ops.portllm.lora_shrink(x, A, slots)),
        "cuda": Impl("cuda", "csrc/cuda/lora_shrink.cu (torch.ops.portllm.lora_shrink, CUDA)", ("cuda",),
                     lambda x, A, slots, tiles=None: torch.ops.portllm.lora_shrink(x, A, slots)),
        "triton": Impl("triton", "portllm.kernels.lora_shrink.lora_shrink_forward "
                       "(torch.ops.portllm.lora_shrink_triton)", ("cpu", "cuda"), _lora_shrink_triton_run),
    },
    "lora_expand_": {
        "reference": Impl("reference", "portllm.reference.lora_expand_", ("cpu", "cuda"),
                          lambda y, h, B, scale, slots, tiles=None: reference.lora_expand_(y, h, B, scale, slots)),
        "cpp": Impl("cpp", "csrc/cpu/lora_expand.cpp (torch.ops.portllm.lora_expand_, CPU)", ("cpu",),
                    lambda y, h, B, scale, slots, tiles=None: torch.ops.portllm.lora_expand_(y, h, B, scale, slots)),
        "cuda": Impl("cuda", "csrc/cuda/lora_expand.cu (torch.ops.portllm.lora_expand_, CUDA)", ("cuda",),
                     lambda y, h, B, scale, slots, tiles=None: torch.ops.portllm.lora_expand_(y, h, B, scale, slots)),
        "triton": Impl("triton", "portllm.kernels.lora_expand.lora_expand_forward "
                       "(torch.ops.portllm.lora_expand_triton_)", ("cpu", "cuda"), _lora_expand_triton_run),
    },
}


# ---------------------------------------------------------------------------------------------
# Backend selection


def backend_unavailable_reason(backend: str, device: torch.device | str, op: str = "patch_add_") -> str | None:
    """None if ``op``'s ``backend`` implementation can run on tensors of ``device``, else why not."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"unknown op {op!r}; portllm's ops are {', '.join(IMPLEMENTATIONS)}")
    if backend not in IMPLEMENTATIONS[op]:
        have = ", ".join(IMPLEMENTATIONS[op])
        return f"{op} has no {backend!r} implementation (it has: {have})"
    return _unavailable(op, IMPLEMENTATIONS[op][backend], device)


def available_backends(device: torch.device | str = "cpu", op: str = "patch_add_") -> list[str]:
    """The backends of ``op`` that can run on ``device``, the default first (``portllm.defaults``)."""
    device = torch.device(device)
    order = defaults.order(op, device)
    ordered = list(order) + [b for b in BACKENDS if b not in order]
    return [b for b in ordered if backend_unavailable_reason(b, device, op) is None]


def default_backend(device: torch.device | str, op: str = "patch_add_") -> str:
    """The backend ``op`` uses on ``device`` when none is named."""
    return available_backends(device, op)[0]


def resolve_backend(backend: str | None, device: torch.device | str, op: str = "patch_add_") -> str:
    """The backend ``op`` on ``device`` will use: the named one (checked), else the default."""
    if backend is None:
        backend = os.environ.get("PORTLLM_BACKEND") or None
    if backend is None or backend == "auto":
        return default_backend(device, op)
    reason = backend_unavailable_reason(backend, device, op)
    if reason is not None:
        raise BackendUnavailableError(f"portllm backend {backend!r} is not available for {op}: {reason}")
    return backend


# ---------------------------------------------------------------------------------------------
# patch_add_


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
    * ``backend``: see the module docstring. ``check_finite=True`` (or ``PORTLLM_CHECK_FINITE=1``)
      first checks B, A and scale for NaN/Inf and raises ``ValueError`` naming the tensor; it is
      off by default because it reads the factors once more and synchronises with the device
      (``portllm.merge.merge_into``, which the workflows use, checks factors and the result).
    * Not differentiable: W is treated as data (it may be an ``nn.Parameter``; autograd does not
      record the update). Factors that require grad are refused while grad mode is on.
    """
    r = _check_patch_add_args(W, B, A)
    s = _scale_vector(scale, r, W.device)
    if check_finite is None:
        check_finite = os.environ.get("PORTLLM_CHECK_FINITE") == "1"
    if check_finite:
        check_factors_finite(B, A, s, "patch_add_")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (B, A, s)):
        raise RuntimeError("patch_add_ is not differentiable: call it under torch.no_grad() "
                           "or detach the factors")
    name = resolve_backend(backend, W.device, "patch_add_")
    if W.numel() == 0 or r == 0:
        return W
    # The one place that keeps the promise "factors that alias W are read before W is written":
    # every backend then reads factors that no write to W can change.
    B = B.clone() if _shares_memory(B, W) else B
    A = A.clone() if _shares_memory(A, W) else A
    with torch.no_grad():
        IMPLEMENTATIONS["patch_add_"][name].run(W, B, A, s)
    return W


def check_factors_finite(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, what: str):
    """Raises ValueError naming ``what`` and the tensor if B, A or the scales hold NaN or Inf."""
    for name, t in (("scale", s), ("B", B), ("A", A)):
        bad = t.numel() - int(torch.isfinite(t).sum())
        if bad:
            raise ValueError(f"{what}: {name} {tuple(t.shape)} has {bad} NaN or Inf values")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() > 0 and b.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _overlaps_itself(W: torch.Tensor) -> bool:
    """Whether two indices of the 2-D W address one element (expand, as_strided)."""
    if W.numel() <= 1:
        return False
    dims = sorted((abs(st), sz) for st, sz in zip(W.stride(), W.shape) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    # Non-overlapping iff each stride is at least the span of the smaller dimensions.
    span = 1
    for st, sz in dims:
        if st < span:
            return True
        span = st * (sz - 1) + span
    return False


def _check_patch_add_args(W, B, A) -> int:
    for name, t in (("W", W), ("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"patch_add_: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"patch_add_: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
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
    if _overlaps_itself(W):
        raise ValueError(
            f"patch_add_: W (shape {tuple(W.shape)}, stride {W.stride()}) has elements that share "
            "memory (an expanded or as_strided view); an in-place update would be wrong. Pass W.clone()."
        )
    return r


def _scale_vector(scale, r: int, device: torch.device) -> torch.Tensor:
    """scale as the float32 [r] tensor the kernels take."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in _FLOAT_DTYPES + (torch.float64,):
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


# ---------------------------------------------------------------------------------------------
# skeleton_mm (PMSS)

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
        if t.dtype not in _FLOAT_DTYPES + (torch.float64,):
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
    return IMPLEMENTATIONS["skeleton_mm"][name].run(A, W, idx, kind)


def resolve_skeleton_backend(backend: str | None, A: torch.Tensor, W: torch.Tensor) -> str:
    """The backend skeleton products of A and W run on: float64 (gradcheck) runs on the reference
    unless a backend is named, and is refused by the GPU backends."""
    fp64 = torch.float64 in (A.dtype, W.dtype)
    if fp64 and backend is None and os.environ.get("PORTLLM_BACKEND") in (None, "", "auto"):
        backend = "reference"
    name = resolve_backend(backend, W.device, "skeleton_mm")
    if fp64 and name in ("triton", "cuda"):
        raise BackendUnavailableError(f"portllm backend {name!r} does not take float64 tensors")
    return name


# ---------------------------------------------------------------------------------------------
# lora_shrink / lora_expand_ (serving: many patches in one batch, portllm.serve)


def _check_slots(slots, T: int, device, op: str):
    if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: slots must be a 1-D int64/int32 tensor, got "
                        f"{getattr(slots, 'dtype', type(slots).__name__)} {tuple(getattr(slots, 'shape', ()))}")
    if slots.shape[0] != T:
        raise ValueError(f"{op}: slots has {slots.shape[0]} entries for {T} tokens")
    if slots.device != device:
        raise ValueError(f"{op}: slots is on {slots.device}, the tokens on {device}")


def lora_shrink(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, *, backend: str | None = None,
                tiles: torch.Tensor | None = None) -> torch.Tensor:
    """h[t] = x[t] · A[slots[t]]ᵀ, fp32 [T, R]; h[t] = 0 where slots[t] < 0.

    x [T, n] (float32/float16/bfloat16), A [P, R, n] (one patch's A per slot, ranks padded with
    zeros), slots [T] int64/int32 (values below P; negative = no patch). Products and accumulation in
    fp32 (bf16×bf16 and fp16×fp16 products are exact in fp32, so tensor-core dots keep this).
    The first half of a patched linear layer, ``portllm.serve.PatchedLinear``. ``tiles``: the
    grouping of ``slots`` from ``lora_tiles`` (computed once, shared by the layers of a forward).
    """
    if x.dim() != 2 or A.dim() != 3:
        raise ValueError(f"lora_shrink: need x [T, n] and A [P, R, n], got x {tuple(x.shape)}, A {tuple(A.shape)}")
    if A.shape[2] != x.shape[1]:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)} and A {tuple(A.shape)} disagree on n")
    for name, t in (("x", x), ("A", A)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"lora_shrink: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if A.device != x.device:
        raise ValueError(f"lora_shrink: A is on {A.device}, x on {x.device}")
    _check_slots(slots, x.shape[0], x.device, "lora_shrink")
    name = resolve_backend(backend, x.device, "lora_shrink")
    if x.shape[0] == 0 or A.shape[1] == 0:
        return torch.zeros(x.shape[0], A.shape[1], dtype=torch.float32, device=x.device)
    return IMPLEMENTATIONS["lora_shrink"][name].run(x, A, slots.to(torch.int64), tiles)


def lora_expand_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor, *,
                 backend: str | None = None, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] ← round(fp32(y[t]) + scale[p] · (h[t] · B[p]ᵀ)), p = slots[t], in place; returns y.

    y [T, m] (float32/float16/bfloat16), h [T, R] fp32 (from ``lora_shrink``), B [P, m, R],
    scale [P] fp32, slots [T]. fp32 accumulation and one rounding (to nearest even) per element; rows
    with slots[t] < 0 are left untouched, bit for bit. The second half of a patched linear layer.
    """
    if y.dim() != 2 or h.dim() != 2 or B.dim() != 3:
        raise ValueError(f"lora_expand_: need y [T, m], h [T, R], B [P, m, R], got y {tuple(y.shape)}, "
                         f"h {tuple(h.shape)}, B {tuple(B.shape)}")
    T, m = y.shape
    P, mb, R = B.shape
    if h.shape != (T, R) or mb != m:
        raise ValueError(f"lora_expand_: shapes do not match: y {tuple(y.shape)}, h {tuple(h.shape)}, "
                         f"B {tuple(B.shape)}")
    if h.dtype != torch.float32:
        raise TypeError(f"lora_expand_: h must be float32 (lora_shrink's output), got {h.dtype}")
    for name, t in (("y", y), ("B", B)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"lora_expand_: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if scale.shape != (P,) or scale.dtype != torch.float32:
        raise ValueError(f"lora_expand_: scale must be float32 [{P}], got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("h", h), ("B", B), ("scale", scale)):
        if t.device != y.device:
            raise ValueError(f"lora_expand_: {name} is on {t.device}, y on {y.device}")
    _check_slots(slots, T, y.device, "lora_expand_")
    name = resolve_backend(backend, y.device, "lora_expand_")
    if T == 0 or m == 0 or R == 0:
        return y
    if _overlaps_itself(y):
        raise ValueError(f"lora_expand_: y (shape {tuple(y.shape)}, stride {y.stride()}) has elements that share "
                         "memory; an in-place update would be wrong")
    IMPLEMENTATIONS["lora_expand_"][name].run(y, h, B, scale, slots.to(torch.int64), tiles)
    return y


def lora_tiles(slots: torch.Tensor, P: int, backend: str) -> torch.Tensor | None:
    """The token grouping the ``backend``'s serving kernels take (``slots`` [T] int64, P slots), to
    compute once and pass to every ``lora_shrink``/``lora_expand_`` call with these slots (every
    layer of a forward); None for the backends that group tokens themselves. Device-side ops only,
    no host synchronisation."""
    if backend != "triton":
        return None
    from portllm.kernels.lora_slots import token_tiles

    return token_tiles(slots.to(torch.int64), P)


# ---------------------------------------------------------------------------------------------
# Registrations with torch.library: fake (meta) implementations so the ops trace under
# torch.compile and pass torch.library.opcheck.

if _ext.available():

    @torch.library.register_fake("portllm::patch_add_")
    def _patch_add_fake(W, B, A, scale) -> None:
        return None

    if _ext.has_kernel("lora_shrink", "CPU") or _ext.has_kernel("lora_shrink", "CUDA"):

        @torch.library.register_fake("portllm::lora_shrink")
        def _lora_shrink_fake(x, A, slots):
            return x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32)

        @torch.library.register_fake("portllm::lora_expand_")
        def _lora_expand_fake(y, h, B, scale, slots) -> None:
            return None

    if _ext.has_kernel("bit_misses", "CPU"):

        @torch.library.register_fake("portllm::bit_misses")
        def _bit_misses_fake(a, b):
            k = torch.library.get_ctx().new_dynamic_size()
            return a.new_empty(k, dtype=torch.int64), a.new_empty(k, dtype=torch.int64)

    if _ext.has_kernel("skeleton_mm", "CPU"):

        @torch.library.register_fake("portllm::skeleton_mm")
        def _skeleton_mm_fake(A, W, idx, kind):
            n_out = {"ct": W.shape[0], "c": idx.shape[0], "r": W.shape[1]}[kind]
            return A.new_empty(A.shape[0], n_out)


@torch.library.custom_op("portllm::patch_add_triton_", mutates_args=("W",))
def _patch_add_triton(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    from portllm.kernels.patch_add import patch_add_forward

    patch_add_forward(W, B, A, scale)


@_patch_add_triton.register_fake
def _patch_add_triton_fake(W, B, A, scale) -> None:
    return None


@torch.library.custom_op("portllm::skeleton_mm_triton", mutates_args=())
def _skeleton_mm_triton(A: torch.Tensor, W: torch.Tensor, idx: torch.Tensor, kind: str) -> torch.Tensor:
    from portllm.kernels.skeleton_mm import skeleton_mm_forward

    return skeleton_mm_forward(A, W, idx, kind)


@_skeleton_mm_triton.register_fake
def _skeleton_mm_triton_fake(A, W, idx, kind):
    n_out = {"ct": W.shape[0], "c": idx.shape[0], "r": W.shape[1]}[kind]
    return A.new_empty(A.shape[0], n_out)


@torch.library.custom_op("portllm::lora_shrink_triton", mutates_args=())
def _lora_shrink_triton(x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor,
                        tiles: Optional[torch.Tensor] = None) -> torch.Tensor:
    from portllm.kernels.lora_shrink import lora_shrink_forward

    return lora_shrink_forward(x, A, slots, tiles)


@_lora_shrink_triton.register_fake
def _lora_shrink_triton_fake(x, A, slots, tiles=None):
    return x.new_empty(x.shape[0], A.shape[1], dtype=torch.float32)


@torch.library.custom_op("portllm::lora_expand_triton_", mutates_args=("y",))
def _lora_expand_triton(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                        slots: torch.Tensor, tiles: Optional[torch.Tensor] = None) -> None:
    from portllm.kernels.lora_expand import lora_expand_forward

    lora_expand_forward(y, h, B, scale, slots, tiles)


@_lora_expand_triton.register_fake
def _lora_expand_triton_fake(y, h, B, scale, slots, tiles=None) -> None:
    return None
