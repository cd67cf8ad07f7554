"""The tools the inspection needs: Triton with its NVIDIA backend, and its bundled cuobjdump."""

from __future__ import annotations

import os


def cuobjdump() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def unavailable() -> str | None:
    """Why the inspection cannot run here, or None."""
    import importlib

    try:
        for mod, names in (("triton.backends.compiler", ("GPUTarget",)), ("triton.compiler", ("ASTSource", "make_backend")),
                           ("triton.runtime.jit", ("MockTensor", "create_function_from_signature"))):
            m = importlib.import_module(mod)
            for n in names:
                if not hasattr(m, n):
                    raise ImportError(f"{mod}.{n} is missing (another Triton version)")
    except ImportError as e:
        return f"Triton with its NVIDIA backend is not installed ({e})"
    if cuobjdump() is None:
        return "Triton's bundled cuobjdump is missing (backends/nvidia/bin)"
    return None
