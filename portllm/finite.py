"""The one NaN/Inf rule of portllm's merges, and the one reading of ``PORTLLM_CHECK_FINITE``.

* Factors and scales holding NaN or Inf are refused, naming the tensor (``check_factors``).
* A merge that would turn finite weights into NaN or Inf (an fp16 weight past 65504) is refused;
  weights that were already NaN or Inf stay the caller's business (``count``, before and after).
* ``check_finite``: True or False as given; None reads ``PORTLLM_CHECK_FINITE`` ("1" = on). The
  workflows (``apply_patch``, ``port``, ``pmss.merge``) pass True by default; the bare op
  ``patch_add_`` passes None, so it checks only when the environment asks (a check reads the
  factors once more and synchronises with the device).
"""

from __future__ import annotations

import os

import torch


def enabled(check_finite: bool | None) -> bool:
    """Whether to check: the argument, or for None the environment (``PORTLLM_CHECK_FINITE=1``)."""
    if check_finite is None:
        return os.environ.get("PORTLLM_CHECK_FINITE") == "1"
    return bool(check_finite)


def count(t: torch.Tensor) -> int:
    """How many elements of t are NaN or Inf."""
    return t.numel() - int(torch.isfinite(t).sum())


def check_factors(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, what: str, error: type = ValueError):
    """Raises ``error`` naming ``what`` and the tensor if B, A or the scales s hold NaN or Inf."""
    for name, t in (("scale", s), ("B", B), ("A", A)):
        bad = count(t)
        if bad:
            raise error(f"{what}: {name} {tuple(t.shape)} has {bad} NaN or Inf values")
