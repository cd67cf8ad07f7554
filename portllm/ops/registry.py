"""The backend registry: which implementations each op has, whether one can run here, and which one runs.

Every op file in this package (``patch_add.py``, ``skeleton_mm.py``, ...) registers its own
implementations here with :func:`register`; this module imports none of them. The backends:

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
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from portllm import _ext, defaults

BACKENDS = ("reference", "cpp", "cuda", "triton")


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op."""

    backend: str
    where: str  # the code: module.function, or source file and the torch op it registers
    devices: tuple[str, ...]  # device types it runs on
    run: Callable  # takes the op's checked arguments


# op name -> backend -> Impl, filled by the op files as they are imported (``portllm info`` prints it)
IMPLEMENTATIONS: dict[str, dict[str, Impl]] = {}


def register(op: str, *impls: Impl) -> None:
    """Registers ``op``'s implementations (once per op; the op file calls this at import)."""
    if op in IMPLEMENTATIONS:
        raise RuntimeError(f"op {op!r} is registered twice")
    for impl in impls:
        if impl.backend not in BACKENDS:
            raise ValueError(f"{op}: unknown backend {impl.backend!r}")
    IMPLEMENTATIONS[op] = {impl.backend: impl for impl in impls}


def standard_impls(op: str, *, reference: Callable, extension: Callable | None, triton: Callable | None,
                   source: str, kernel: str | None = None, extension_devices=("cpu", "cuda")) -> list[Impl]:
    """The usual rows of an op: the reference (``portllm.reference.<op>``), the extension's C++ and CUDA
    kernels (``csrc/cpu/<source>.cpp``, ``csrc/cuda/<source>.cu``, both ``torch.ops.portllm.<op>``), and
    the Triton kernel (``portllm.kernels.<source>.<kernel>``, as ``torch.ops.portllm.<op>_triton``)."""
    impls = [Impl("reference", f"portllm.reference.{op}", ("cpu", "cuda"), reference)]
    if extension is not None:
        if "cpu" in extension_devices:
            impls.append(Impl("cpp", f"csrc/cpu/{source}.cpp (torch.ops.portllm.{op}, CPU)", ("cpu",), extension))
        if "cuda" in extension_devices:
            impls.append(Impl("cuda", f"csrc/cuda/{source}.cu (torch.ops.portllm.{op}, CUDA)", ("cuda",), extension))
    if triton is not None:
        tname = op[:-1] + "_triton_" if op.endswith("_") else op + "_triton"
        impls.append(Impl("triton", f"portllm.kernels.{source}.{kernel} (torch.ops.portllm.{tname})",
                          ("cpu", "cuda"), triton))
    return impls


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


def run(op: str, backend: str, *args):
    """Runs ``op``'s ``backend`` implementation on already checked arguments."""
    return IMPLEMENTATIONS[op][backend].run(*args)
