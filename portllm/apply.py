"""Merge patches into a model in memory: ``apply_patch`` and ``remove_patch``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from portllm.checkpoint import ModelWeights, tensor_target, weight_key
from portllm.compat import IncompatiblePatchError, check_compatibility, resolve_fan_in_fan_out
from portllm.exact import ExactMerge, ExactUndoError, merge_exact, remove_exact
from portllm.experts import ExpertPatchError
from portllm.merge import plan_merge, prepare_merge
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
                backend: str | None = None, check_finite: bool | None = True, exact: bool = False,
                _record: bool = True) -> torch.nn.Module:
    """Merges ``W += Σ_i scale_i · patch_i`` into the model's weights, in place; returns the model.

    Several patches (task arithmetic) are merged per module in one pass of ``patch_add_``, with
    concatenated factors. The model must hold every patch module with the right shape; otherwise
    ``IncompatiblePatchError`` names the module and the shapes, before any weight changes.
    ``check_finite`` (default on): factors or scales with NaN/Inf, and merges that would make a weight
    NaN/Inf (overflow of its dtype), are refused with ``NonFiniteMergeError`` naming the module; the
    model is left unchanged (every module's merge is checked before any weight is written).

    ``exact=True`` also records with the model, in the same pass, what makes the matching
    ``remove_patch`` restore every weight bit for bit (``portllm.exact``: the few elements where
    subtracting the delta again does not give the old bits back, about 0.4 bits per weight at a 2%
    relative delta). The weights it gives are the plain merge's, bit for bit; it costs about three
    merges. Exact merges stack: remove them in the reverse order.

    Every merge is remembered with the model (a digest of the patches and scales; the exact ones with
    their undo), so that ``remove_patch`` can refuse what would corrupt the weights: see there.
    """
    patches, scales = _as_lists(patch, scale)
    source = ModelWeights(model)
    try:
        resolved = [resolve_fan_in_fan_out(source, p.for_model(model)) for p in patches]
    except ExpertPatchError as e:
        raise IncompatiblePatchError(str(e)) from None
    for p in resolved:
        check_compatibility(source, p).raise_for_errors()
    per_module: dict[str, list] = {}
    for p, w in zip(resolved, scales):
        for name, m in p.items():
            per_module.setdefault(name, []).append((m, w))
    params = dict(model.named_parameters(remove_duplicate=False))
    per_module = _merge_tied(per_module, params)
    digest = _digest(patches, scales)
    if exact:
        plans = {name: plan_merge(weight_of(params, name), entries, backend=backend, check_finite=check_finite,
                                  name=name) for name, entries in per_module.items()}
        _records(model).append(merge_exact(plans, per_module, patches, scales, digest))
    else:
        merges = [prepare_merge(weight_of(params, name), entries, backend=backend, check_finite=check_finite,
                                name=name) for name, entries in per_module.items()]
        for merge in merges:
            merge()
        if _record:
            _records(model).append(_Merged(digest))
    if _record:
        removed = _removed(model)
        removed[:] = [d for d in removed if d != digest]  # merged again: removable again
    return model


def weight_of(params: dict, name: str) -> torch.Tensor:
    """The weight patch module ``name`` updates, as a tensor of the model's (a 2-D view ``P[e]`` for
    expert e of a fused parameter)."""
    key, index = tensor_target(weight_key(name))
    W = params[key].data
    return W if index is None else W[index]


def _merge_tied(per_module: dict[str, list], params: dict) -> dict[str, list]:
    """Modules whose weights are one tensor (tied, e.g. an output head and its embedding) become one
    merge of all their entries, under the first module's name: the tensor is read and written once
    and gets every module's delta (as PEFT's merge, which adds each module's delta to the shared
    weight), and an exact merge records one undo for it, which can be removed."""
    by_tensor: dict[int, str] = {}
    out: dict[str, list] = {}
    for name, entries in per_module.items():
        key, index = tensor_target(weight_key(name))
        key = (id(params[key]), index)
        first = by_tensor.setdefault(key, name)
        if first == name:
            out[name] = list(entries)
            continue
        if entries[0][0].fan_in_fan_out != out[first][0][0].fan_in_fan_out:
            raise ValueError(f"modules {first} and {name} share one weight (tied) but the patch marks only one "
                             "of them fan_in_fan_out")
        out[first].extend(entries)
    return out


def remove_patch(model: torch.nn.Module, patch: Patch | Sequence[Patch], scale: float | Sequence[float] = 1.0, *,
                 exact: bool | None = None, **kwargs) -> torch.nn.Module:
    """Undoes ``apply_patch(model, patch, scale)``.

    If that merge was ``exact=True`` (the latest merge on the model, with the same patches and
    scales, compared by value), every weight comes back bit for bit; if a weight changed since,
    ``ExactUndoError`` names it and nothing is written. ``exact=True`` insists on that;
    ``exact=False`` (or a plain merge) merges the negated update instead: in fp32 within a few ulp,
    in bf16/fp16 an ulp or so off per element. Refused before anything is written
    (``ExactUndoError``):

    * removing an exact merge that is not the latest merge, or any merge with an exact merge after
      it: merges are a stack, and an exact undo needs the weights its merge left;
    * removing again what was already removed (and not merged again since): it would subtract the
      patch twice. (A patch merged before this process knew the model, e.g. saved merged, has no
      record: it is removed by subtraction.)
    """
    patches, scales = _as_lists(patch, scale)
    records = _records(model)
    digest = _digest(patches, scales)
    hits = [i for i, r in enumerate(records) if r.digest == digest]
    if not hits:
        if exact:
            raise ExactUndoError("no exact merge of this patch (with these scales) is recorded on the model; apply it "
                                 "with apply_patch(..., exact=True) first, or pass exact=False")
        if digest in _removed(model):
            raise ExactUndoError("this patch (with these scales) was already removed from the model, and not merged "
                                 "again since: removing it again would subtract it twice. Nothing was changed")
        apply_patch(model, patches, [-s for s in scales], _record=False, **kwargs)
        _note_removed(model, digest)
        return model
    i = hits[-1]
    rec, later = records[i], records[i + 1:]
    if (isinstance(rec, ExactMerge) and later) or any(isinstance(r, ExactMerge) for r in later):
        what = "exact merge" if isinstance(rec, ExactMerge) else "merge"
        raise ExactUndoError(f"this patch's {what} is not the latest one on the model ({len(later)} merge(s) were "
                             "applied after it, exact ones among them); remove those first, in reverse order. "
                             "Nothing was changed")
    if exact and not isinstance(rec, ExactMerge):
        raise ExactUndoError("this patch's merge was not exact (apply_patch(..., exact=True)): it can be removed "
                             "only by subtraction; pass exact=False")
    if isinstance(rec, ExactMerge) and exact is not False:
        remove_exact(dict(model.named_parameters(remove_duplicate=False)), rec, records)
    else:
        apply_patch(model, patches, [-s for s in scales], _record=False, **kwargs)
    records.pop(i)
    _note_removed(model, digest)
    return model


_REMOVED = "_portllm_removed_merges"
_REMOVED_KEPT = 64  # digests of removed merges remembered per model (oldest forgotten)


def _removed(model) -> list[str]:
    return model.__dict__.setdefault(_REMOVED, [])


def _note_removed(model, digest: str):
    removed = _removed(model)
    removed.append(digest)
    del removed[:-_REMOVED_KEPT]


def _digest(patches: list[Patch], scales: list[float]) -> str:
    """Identity of a merge by value: module names, shapes, scales (as the merge uses them, fp32) and
    factor values. A patch saved and reloaded gives the same digest."""
    import hashlib

    h = hashlib.sha256()
    for p, w in zip(patches, scales):
        h.update(f"patch|{_f32(w)!r}|{len(p.modules)}|{len(p.expert_factors)}|{_f32(p.expert_scale)!r}".encode())
        for key in sorted(p.expert_factors):
            f = p.expert_factors[key]
            h.update(f"|expert|{key}|{tuple(f.B.shape)}|{tuple(f.A.shape)}|{f.B.dtype}|{f.A.dtype}".encode())
            for t in (f.B, f.A):
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        h.update(repr(sorted((p.expert_config or {}).items())).encode())
        for name in sorted(p.modules):
            m = p.modules[name]
            h.update(f"|{name}|{_f32(m.scale)!r}|{m.fan_in_fan_out}|{tuple(m.B.shape)}|{tuple(m.A.shape)}|"
                     f"{m.B.dtype}|{m.A.dtype}".encode())
            for t in (m.B, m.A):
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Merged:
    """A plain merge on the model: only what identifies it."""

    digest: str


# ---------------------------------------------------------------------------------------------
# the merges recorded with a model

_RECORDS = "_portllm_exact_merges"


def exact_merges(model: torch.nn.Module) -> list[ExactMerge]:
    """The exact merges recorded on ``model``, oldest first (``nbytes``, ``bits_per_weight``)."""
    return [r for r in _records(model) if isinstance(r, ExactMerge)]


def _records(model) -> list:
    """Every merge on the model this process made, oldest first: ExactMerge or _Merged."""
    recs = model.__dict__.get(_RECORDS)
    if recs is None:
        recs = []
        model.__dict__[_RECORDS] = recs
    return recs


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))
