"""bit_misses: where two integer views of a weight differ, and by how much (the exact undo's comparison).

Math: :func:`bit_misses`. Reference: ``portllm.reference.bit_misses``. Kernel: ``csrc/cpu/bit_misses.cpp``
(one read of both inputs). Used by ``portllm.exact``. Tests: ``tests/test_exact_undo.py``. Benchmark:
``benchmarks/bench_exact.py``.
"""

from __future__ import annotations

import torch

from portllm import _ext, reference
from portllm.ops import registry

_INTS = (torch.int16, torch.int32)


def bit_misses(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``loc`` = the positions i where a[i] != b[i], ascending, and ``a[loc] - b[loc]``, both int64.

    a, b: 1-D, contiguous, the same length and integer dtype (int16 or int32: the bit patterns of
    bf16/fp16 or fp32 weights), on one device."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in _INTS:
            raise TypeError(f"bit_misses: {name} must be a 1-D int16/int32 tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        raise ValueError(f"bit_misses: a ({a.dtype} {tuple(a.shape)} on {a.device}) and b ({b.dtype} "
                         f"{tuple(b.shape)} on {b.device}) must match in dtype, length and device")
    name = registry.resolve_backend(backend, a.device, "bit_misses")
    return registry.run("bit_misses", name, a.contiguous(), b.contiguous())


if _ext.has_kernel("bit_misses", "CPU"):

    @torch.library.register_fake("portllm::bit_misses")
    def _bit_misses_fake(a, b):
        k = torch.library.get_ctx().new_dynamic_size()
        return a.new_empty(k, dtype=torch.int64), a.new_empty(k, dtype=torch.int64)


registry.register("bit_misses", *registry.standard_impls(
    "bit_misses", source="bit_misses", triton=None, extension_devices=("cpu",),
    reference=lambda a, b: reference.bit_misses(a, b),
    extension=lambda a, b: torch.ops.portllm.bit_misses(a, b)))
