"""Loads the compiled extension ``portllm._C`` once. If it is missing or broken, portllm still
works on its reference backend and says so once, with the reason and how to rebuild."""

from __future__ import annotations

import functools
import warnings

import torch  # noqa: F401  (the extension links against torch; load torch first)

C = None
ERROR: str | None = None

try:
    from portllm import _C as C  # noqa: N811
except Exception as e:  # ImportError, undefined symbol from a build against another torch, ...
    ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        "portllm: the compiled extension portllm._C is not available "
        f"({ERROR}); the C++ and CUDA backends are off and the reference backend is used. "
        "Rebuild with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return C is not None


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``portllm::op`` under ``dispatch_key`` (fixed
    once the extension is loaded: asked once per process)."""
    if C is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"portllm::{op}", dispatch_key)
    except RuntimeError:  # the op is not in this build (an extension built from older sources)
        return False


def build_info() -> str:
    return torch.ops.portllm.build_info() if C is not None else f"extension not loaded ({ERROR})"


def cpu_isa() -> str:
    """The vector path the C++ CPU kernels take on this machine, after ``PORTLLM_CPU_ISA``:
    ``avx512bf16``, ``avx512``, ``avx2`` or ``generic`` (``generic`` without the extension)."""
    if C is None:
        return "generic"
    try:
        return torch.ops.portllm.cpu_isa()
    except (AttributeError, RuntimeError):  # an extension built from older sources
        return "generic"
