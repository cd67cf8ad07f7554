"""portllm's ops: one Python entry per op, with argument checks and backend dispatch.

One file per op, each holding the op's checks, its implementations (registered with
``registry.register``), its fake (meta) implementations and its Triton custom op:

* ``patch_add_``: W += B·diag(s)·A in place, every merge (``portllm/ops/patch_add.py``)
* ``patch_add_experts_``: the same for each expert of a fused W [E, m, n] (``portllm/ops/patch_add_experts.py``)
* ``skeleton_mm``: products with gathered columns or rows of W, PMSS (``portllm/ops/skeleton_mm.py``)
* ``lora_shrink``: h = x·A[slot]ᵀ per token, serving (``portllm/ops/lora_shrink.py``)
* ``lora_expand_``: y += s·h·B[slot]ᵀ per token, serving (``portllm/ops/lora_expand.py``)
* ``bit_misses``: where two bit patterns differ, the exact undo (``portllm/ops/bit_misses.py``)
* ``fp8_merge``: a patch merged into a block-scaled FP8 weight, requantized (``portllm/ops/fp8_merge.py``)
* ``mxfp4_merge``: a patch merged into one expert's MXFP4 weight, requantized (``portllm/ops/mxfp4_merge.py``)

Backends, their availability and the default choice: ``portllm/ops/registry.py``. This package is
the only code that imports triton (lazily) or ``portllm._C``'s ops.
"""

from __future__ import annotations

from portllm import reference  # noqa: F401  (the oracle, as ``ops.reference``)
from portllm.finite import check_factors as check_factors_finite  # noqa: F401
from portllm.ops.registry import (  # noqa: F401
    BACKENDS,
    IMPLEMENTATIONS,
    BackendUnavailableError,
    Impl,
    available_backends,
    backend_unavailable_reason,
    default_backend,
    resolve_backend,
)
from portllm.ops.patch_add import patch_add_  # noqa: E402,F401
from portllm.ops.patch_add_experts import patch_add_experts_  # noqa: E402,F401
from portllm.ops.skeleton_mm import resolve_skeleton_backend, skeleton_mm  # noqa: E402,F401
from portllm.ops.lora_shrink import lora_shrink  # noqa: E402,F401
from portllm.ops.lora_expand import lora_expand_  # noqa: E402,F401
from portllm.ops.lora_tiles import lora_tiles  # noqa: E402,F401
from portllm.ops.bit_misses import bit_misses  # noqa: E402,F401
from portllm.ops.fp8_merge import fp8_merge  # noqa: E402,F401
from portllm.ops.mxfp4_merge import mxfp4_merge  # noqa: E402,F401

__all__ = ["BACKENDS", "IMPLEMENTATIONS", "BackendUnavailableError", "Impl", "available_backends",
           "backend_unavailable_reason", "bit_misses", "check_factors_finite", "default_backend", "fp8_merge",
           "lora_expand_",
           "lora_shrink", "lora_tiles", "mxfp4_merge", "patch_add_", "patch_add_experts_", "reference", "resolve_backend", "resolve_skeleton_backend",
           "skeleton_mm"]
