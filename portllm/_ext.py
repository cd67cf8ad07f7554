"""Loads the compiled extension ``portllm._C`` once. If it is missing or broken, portllm still
works on its reference backend and says so once, naming the cause (the install's own record,
``portllm/_build.json``, written by setup.py) and the fix. On a CUDA machine whose extension was
built without its CUDA kernels, it says that too, and why."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch  # noqa: F401  (the extension links against torch; load torch first)

C = None
ERROR: str | None = None
_REBUILD = ("install torch first, then reinstall portllm with `pip install --no-build-isolation .` (-e for a "
            "checkout) where a C++ compiler is found; see README, \"Set up\"")


def build_record() -> dict:
    """What setup.py built and why not (``{"extension": ..., "cuda": ..., "torch": ...}``); {} if the
    install left no record."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")) as f:
            rec = json.load(f)
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def _why_missing() -> str:
    rec = build_record().get("extension", "")
    if rec.startswith("not built: "):
        return f"portllm._C was not built at install: {rec.removeprefix('not built: ')}"
    return "portllm._C is not installed (the install left no build record)"


if importlib.util.find_spec("portllm._C") is None:
    ERROR = _why_missing()
else:
    try:
        from portllm import _C as C  # noqa: N811
    except Exception as e:  # undefined symbol from a build against another torch, a broken .so, ...
        built_for = build_record().get("torch")
        other = (f"; it was built against torch {built_for}, and torch {torch.__version__} is installed"
                 if built_for and built_for != torch.__version__ else "")
        ERROR = f"portllm._C does not load ({type(e).__name__}: {e}){other}"
if ERROR is not None:
    warnings.warn(f"portllm: {ERROR}. The C++ and CUDA backends are off and the reference backend is used "
                  f"(4-7x slower on a CPU). Fix: {_REBUILD}.", RuntimeWarning, stacklevel=2)


def cuda_kernels_missing() -> str | None:
    """Why the extension has no CUDA kernels, where that matters (torch has CUDA); else None."""
    if C is None or torch.version.cuda is None:
        return None
    cuda = build_record().get("cuda", "")
    return cuda.removeprefix("not built: ") if cuda.startswith("not built: ") else None


if C is not None and torch.version.cuda is not None and cuda_kernels_missing() and torch.cuda.is_available():
    warnings.warn(f"portllm: portllm._C was built without its CUDA kernels ({cuda_kernels_missing()}); the cuda "
                  "backend is off on this GPU (Triton and the reference run). Fix: set CUDA_HOME to the CUDA "
                  "toolkit (bin/nvcc, lib64/libcudart.so) and reinstall portllm.", RuntimeWarning, stacklevel=2)


def available() -> bool:
    return C is not None


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``portllm::op`` under ``dispatch_key`` (fixed
    once the extension is loaded: asked once per process). A plain dict, not functools.lru_cache,
    which torch.compile warns about when it traces a call."""
    key = (op, dispatch_key)
    if key not in _HAS_KERNEL:
        if C is None:
            return False
        try:
            _HAS_KERNEL[key] = torch._C._dispatch_has_kernel_for_dispatch_key(f"portllm::{op}", dispatch_key)
        except RuntimeError:  # the op is not in this build (an extension built from older sources)
            _HAS_KERNEL[key] = False
    return _HAS_KERNEL[key]


def build_info() -> str:
    return torch.ops.portllm.build_info() if C is not None else f"extension not loaded ({ERROR})"


def kernels_built() -> list[str]:
    """One line per part of the extension: built, or not and why (``portllm info``)."""
    rec = build_record()
    if C is None:
        return [f"C++ CPU kernels: not available: {ERROR}", "CUDA kernels: not available (no extension)"]
    cuda = rec.get("cuda") or ("built" if "cuda=1" in build_info() else "not built")
    return ["C++ CPU kernels: built", f"CUDA kernels: {cuda}"]


def cpu_isa() -> str:
    """The vector path the C++ CPU kernels take on this machine, after ``PORTLLM_CPU_ISA``:
    ``avx512bf16``, ``avx512``, ``avx2`` or ``generic`` (``generic`` without the extension)."""
    if C is None:
        return "generic"
    try:
        return torch.ops.portllm.cpu_isa()
    except (AttributeError, RuntimeError):  # an extension built from older sources
        return "generic"
