"""patch_add_experts_: ``W[e] += B[e] · diag(s_e) · A[e]`` for every expert e of a fused [E, m, n] weight, in place.

Math and rounding: ``patch_add_``'s, per expert (fp32 accumulation, one rounding to W's dtype). The
arguments are checked once for the whole tensor, then each backend's ``patch_add_`` kernel runs on
the experts' 2-D views in turn, with no per-expert checks or dispatch (``registry.run``); the Triton
backend merges every expert in one launch (the expert is the grid's second axis,
``kernels/patch_add.py``), where a loop would pay one launch per expert (128 for Qwen3-30B-A3B).
Reference: ``portllm.reference.patch_add_`` per expert. Kernels: ``patch_add_``'s
(``csrc/cpu/patch_add.cpp``, ``csrc/cuda/patch_add.cu``, ``kernels/patch_add.py``). Used for mixture-of-experts patches
(``portllm.experts``). Tests: ``tests/test_patch_add_experts.py``. Benchmark:
``benchmarks/bench_patch_add.py`` (the ``experts`` cases).
"""

from __future__ import annotations

import torch

from portllm.ops import registry
from portllm.ops.checks import FLOAT_DTYPES, overlaps_itself
from portllm.ops.patch_add import prepare


def patch_add_experts_(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float | torch.Tensor = 1.0, *,
                       backend: str | None = None, check_finite: bool | None = None) -> torch.Tensor:
    """W[e] += B[e] · diag(scale[e]) · A[e] for e < E, in place; returns W.

    W [E, m, n] bfloat16, float16 or float32 (any strides whose experts do not overlap: a transposed
    view ``P.transpose(1, 2)`` of a GPT-OSS-style [E, in, out] parameter works); B [E, m, r] and
    A [E, r, n] any of those dtypes; ``scale`` a number, [r] (shared by the experts) or [E, r].
    Each expert is exactly ``patch_add_(W[e], B[e], A[e], scale[e])`` on the same backend: the same
    bits. ``backend``, ``check_finite``: as ``patch_add_``'s."""
    for name, t in (("W", W), ("B", B), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"patch_add_experts_: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"patch_add_experts_: {name} must be 3-D [experts, ., .], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"patch_add_experts_: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.device != W.device:
            raise ValueError(f"patch_add_experts_: {name} is on {t.device} but W is on {W.device}")
    (E, m, n), (eb, mb, r), (ea, ra, na) = W.shape, B.shape, A.shape
    if not (eb == ea == E and mb == m and na == n and ra == r):
        raise ValueError(f"patch_add_experts_: shapes do not match: W {tuple(W.shape)}, B {tuple(B.shape)}, "
                         f"A {tuple(A.shape)} (need W [E, m, n], B [E, m, r], A [E, r, n])")
    if overlaps_itself(W):
        raise ValueError(f"patch_add_experts_: W (shape {tuple(W.shape)}, stride {W.stride()}) has elements that "
                         "share memory; an in-place update would be wrong. Pass W.clone()")
    s = _scales(scale, E, r, W.device)
    name, B, A = prepare(W, B, A, s, backend, check_finite, "patch_add_experts_")
    if W.numel() == 0 or r == 0:
        return W
    with torch.no_grad():
        if name == "triton":  # one launch for every expert (the expert is the grid's second axis)
            torch.ops.portllm.patch_add_experts_triton_(W, B, A, s)
            return W
        for e in range(E):
            registry.run("patch_add_", name, W[e], B[e], A[e], s[e])
    return W


@torch.library.custom_op("portllm::patch_add_experts_triton_", mutates_args=("W",))
def _patch_add_experts_triton(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> None:
    from portllm.kernels.patch_add import patch_add_experts_forward

    patch_add_experts_forward(W, B, A, scale)


@_patch_add_experts_triton.register_fake
def _patch_add_experts_triton_fake(W, B, A, scale) -> None:
    return None


def _scales(scale, E: int, r: int, device) -> torch.Tensor:
    """scale as the float32 [E, r] tensor of per-expert, per-rank scales."""
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"patch_add_experts_: scale has dtype {scale.dtype}; give a float or a float tensor")
        s = scale.to(device=device, dtype=torch.float32)
        if s.dim() == 0 or s.shape == (r,):
            return s.expand(E, r).contiguous()
        if s.shape == (E, r):
            return s.contiguous()
        raise ValueError(f"patch_add_experts_: scale must be a number, [{r}] or [{E}, {r}], got {tuple(s.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"patch_add_experts_: scale must be a number or a tensor, got {type(scale).__name__}")
    return torch.full((E, r), float(scale), dtype=torch.float32, device=device)
