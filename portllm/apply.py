"""Merge patches into a model in memory: ``apply_patch`` and ``remove_patch``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from portllm.checkpoint import ModelWeights, weight_key
from portllm.compat import check_compatibility, resolve_fan_in_fan_out
from portllm.merge import prepare_merge
from portllm.patch import Patch


def _as_lists(patch, scale) -> tuple[list[Patch], list[float]]:
    patches = list(patch) if isinstance(patch, (list, tuple)) else [patch]
    if not all(isinstance(p, Patch) for p in patches):
        raise TypeError("patch must be a portllm.Patch or a list of them (load files with Patch.load)")
    if isinstance(scale, (int, float)):
        scales = [float(scale)] * len(patches)
    else:
        scales = [float(s) for s in scale]
        if len(scales) != len(patches):
            raise ValueError(f"{len(patches)} patches but {len(scales)} scales")
    return patches, scales


def apply_patch(model: torch.nn.Module, patch: Patch | Sequence[Patch], scale: float | Sequence[float] = 1.0, *,
                backend: str | None = None, check_finite: bool | None = True) -> torch.nn.Module:
    """Merges ``W += Σ_i scale_i · patch_i`` into the model's weights, in place; returns the model.

    Several patches (task arithmetic) are merged per module in one pass of ``patch_add_``, with
    concatenated factors. The model must hold every patch module with the right shape; otherwise
    ``IncompatiblePatchError`` names the module and the shapes, before any weight changes.
    ``check_finite`` (default on): factors or scales with NaN/Inf, and merges that would make a weight
    NaN/Inf (overflow of its dtype), are refused with ``NonFiniteMergeError`` naming the module; the
    model is left unchanged (every module's merge is checked before any weight is written).
    """
    patches, scales = _as_lists(patch, scale)
    source = ModelWeights(model)
    patches = [resolve_fan_in_fan_out(source, p) for p in patches]
    for p in patches:
        check_compatibility(source, p).raise_for_errors()
    per_module: dict[str, list] = {}
    for p, w in zip(patches, scales):
        for name, m in p.items():
            per_module.setdefault(name, []).append((m, w))
    params = dict(model.named_parameters(remove_duplicate=False))
    merges = [prepare_merge(params[weight_key(name)].data, entries, backend=backend, check_finite=check_finite,
                            name=name) for name, entries in per_module.items()]
    for merge in merges:
        merge()
    return model


def remove_patch(model: torch.nn.Module, patch: Patch | Sequence[Patch], scale: float | Sequence[float] = 1.0,
                 **kwargs) -> torch.nn.Module:
    """Undoes ``apply_patch(model, patch, scale)`` by merging the negated update.

    Exact up to rounding: in fp32 the weights come back within a few ulp; in bf16/fp16 each merge
    rounds once, so ``remove_patch(apply_patch(W))`` can differ from W by an ulp or so per element.
    Keep a copy of the weights where bit-exact restoration matters.
    """
    patches, scales = _as_lists(patch, scale)
    return apply_patch(model, patches, [-s for s in scales], **kwargs)
