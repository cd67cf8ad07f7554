"""The one merge step every workflow uses: ``plan_merge(W, entries)`` plans it, ``merge_into`` runs it.

``apply_patch``, ``remove_patch``, ``port`` and ``pmss.merge`` all come down to the same sequence:
take the patch modules that touch one weight, concatenate their factors, orient the update as the
weight is stored (``fan_in_fan_out``: the update applies to Wᵀ), check (``portllm.finite``: the one
NaN/Inf rule), resolve the backend, and run ``patch_add_``. ``plan_merge`` does it once into a
``MergePlan``; plain merges run the plan here (``prepare_merge``/``merge_into``), exact ones in
``portllm.exact`` (``merge_exact``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from portllm import finite, ops
from portllm.patch import PatchModule


class NonFiniteMergeError(ValueError):
    """A merge would write NaN or Inf into weights that were finite (or its factors hold them)."""


_WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP32_MAX = torch.finfo(torch.float32).max


def check_weight_dtype(W: torch.Tensor, what: str):
    """TypeError naming ``what`` for a weight dtype the merge kernels do not take."""
    if W.dtype in _WEIGHT_DTYPES:
        return
    hint = ("an FP8 weight: port the checkpoint instead (`portllm port` merges into block-scaled and "
            "compressed-tensors FP8 in its own format, or writes it dequantized with --dtype bfloat16), or load "
            "the model dequantized"
            if W.dtype.is_floating_point
            and W.dtype.itemsize == 1 else
            "convert the model to float32 first" if W.dtype == torch.float64 else
            "a quantized or integer weight: portllm cannot merge into it")
    raise TypeError(f"{what}: the weight is {str(W.dtype).removeprefix('torch.')}; portllm merges into bfloat16, "
                    f"float16 or float32 weights ({hint})")


def merge_factors(entries: Sequence[tuple[PatchModule, float]], device, what: str = "merge") -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenated factors and per-rank scales of several patch modules of one weight:
    Σ_i w_i·s_i·B_i·A_i = [B_1 … B_k] · diag(w_1·s_1…, …, w_k·s_k…) · [A_1; …; A_k]."""
    for m, w in entries:
        v = m.scale * w
        if math.isfinite(v) and abs(v) > _FP32_MAX:  # (NaN and Inf are the finiteness check's to name)
            raise ValueError(f"{what}: scale {m.scale:g} × {w:g} = {v:g} does not fit the merge's float32 scales "
                             f"(largest {_FP32_MAX:.4g})")
    dtype = entries[0][0].B.dtype
    for m, _ in entries[1:]:
        dtype = torch.promote_types(dtype, m.B.dtype)
    B = torch.cat([m.B.to(device=device, dtype=dtype) for m, _ in entries], dim=1)
    A = torch.cat([m.A.to(device=device, dtype=dtype) for m, _ in entries], dim=0)
    s = torch.cat([torch.full((m.rank,), m.scale * w, dtype=torch.float32) for m, w in entries]).to(device)
    return B, A, s


def check_factors(B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, what: str):
    """NonFiniteMergeError naming ``what`` and the tensor if B, A or the scales hold NaN or Inf."""
    finite.check_factors(B, A, s, what, error=NonFiniteMergeError)


def overflow_error(what: str, count: int, W: torch.Tensor) -> NonFiniteMergeError:
    """The refusal of a merge that would turn ``count`` finite weights of W into NaN or Inf."""
    return NonFiniteMergeError(
        f"{what}: the merge would make {count} of {W.numel()} weights NaN or Inf ({W.dtype} "
        f"holds at most {torch.finfo(W.dtype).max:.6g}); refusing. Lower the scale, merge in a wider dtype, "
        "or pass check_finite=False to merge anyway")


def _cannot_overflow(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> bool:
    """True if every |W + B·diag(s)·A| is surely below W's dtype's largest finite value (so the merge
    cannot create Inf), judged from max|W| and Σ_k |s_k|·max|B[:, k]|·max|A[k, :]|. Reads W once,
    with no temporary; False for a W that already holds NaN or Inf."""
    lo, hi = torch.aminmax(W)
    wmax = max(-float(lo), float(hi))
    dmax = float((s.double().abs() * B.abs().amax(0).double() * A.abs().amax(1).double()).sum())
    limit = torch.finfo(W.dtype).max
    return wmax + dmax * (1 + 1e-3) < limit  # (the slack covers fp32 accumulation error)


@dataclass
class MergePlan:
    """One weight's merge, planned and checked once; plain merges (``run``) and exact ones
    (``portllm.exact``) both carry it out.

    ``target`` is the weight as the update applies to it (Wᵀ for ``fan_in_fan_out`` patches),
    ``B``, ``A``, ``s`` the concatenated factors and per-rank scales, ``backend`` the resolved
    ``patch_add_`` backend, ``check_finite`` the resolved NaN/Inf setting (``portllm.finite``)."""

    target: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    s: torch.Tensor
    backend: str
    check_finite: bool
    what: str
    fan_in_fan_out: bool

    def run(self, target: torch.Tensor | None = None, negate: bool = False):
        """``patch_add_`` of the planned update into ``target`` (default: the weight)."""
        ops.patch_add_(self.target if target is None else target, self.B, self.A, -self.s if negate else self.s,
                       backend=self.backend, check_finite=False)

    def cannot_overflow(self) -> bool:
        return _cannot_overflow(self.target, self.B, self.A, self.s)

    def refuse_if_added(self, before: int):
        """NonFiniteMergeError if the weight now holds more NaN/Inf than the ``before`` count."""
        added = finite.count(self.target) - before
        if added > 0:
            raise overflow_error(self.what, added, self.target)


def plan_merge(W: torch.Tensor, entries: Sequence[tuple[PatchModule, float]], *, backend: str | None = None,
               check_finite: bool | None = True, name: str = "", factors_checked: bool = False) -> MergePlan:
    """Plans the merge of ``entries`` ``[(PatchModule, w_i)]`` into W (see ``merge_into``): the
    orientation, the weight's dtype, the factors and scales, the backend (an unavailable one fails
    here), and the factors' NaN/Inf check (skipped for ``factors_checked``: the caller checked every
    factor once, as ``port`` does for the whole patch). Changes nothing."""
    what = f"module {name}" if name else "merge"
    if len({m.fan_in_fan_out for m, _ in entries}) > 1:
        raise ValueError(f"{what}: the patches disagree on fan_in_fan_out")
    check_weight_dtype(W, what)
    fan_in_fan_out = entries[0][0].fan_in_fan_out
    B, A, s = merge_factors(entries, W.device, what)
    check = finite.enabled(check_finite)
    if check and not factors_checked:
        check_factors(B, A, s, what)
    target = W.t() if fan_in_fan_out else W
    return MergePlan(target, B, A, s, ops.resolve_backend(backend, W.device, "patch_add_"), check, what,
                     fan_in_fan_out)


def prepare_merge(W: torch.Tensor, entries: Sequence[tuple[PatchModule, float]], *, backend: str | None = None,
                  check_finite: bool | None = True, name: str = "", scratch: bool = False,
                  factors_checked: bool = False) -> Callable[[], None]:
    """Checks a merge (see ``merge_into``) without changing W, and returns the function that
    performs it. Several weights are merged all-or-nothing by preparing every one first."""
    if not entries:
        return lambda: None
    plan = plan_merge(W, entries, backend=backend, check_finite=check_finite, name=name,
                      factors_checked=factors_checked)
    # One read for the bound (aminmax) instead of two non-finite scans: torch's bf16 isfinite-sum
    # took 344 ms for 4096x14336 on this repository's EPYC (2 threads), aminmax 3.6 ms. Only a
    # merge the bound cannot clear (a huge delta, or W already holding NaN/Inf) pays the scans.
    if not plan.check_finite or plan.cannot_overflow():
        return plan.run
    if scratch:
        def merge_and_check():
            before = finite.count(plan.target)
            plan.run()
            plan.refuse_if_added(before)
        return merge_and_check
    work = plan.target.clone()
    plan.run(work)
    added = finite.count(work) - finite.count(plan.target)
    if added > 0:
        raise overflow_error(plan.what, added, W)
    return lambda: plan.target.copy_(work)


def merge_into(W: torch.Tensor, entries: Sequence[tuple[PatchModule, float]], *, backend: str | None = None,
               check_finite: bool | None = True, name: str = "", scratch: bool = False,
               factors_checked: bool = False) -> torch.Tensor:
    """W += Σ_i w_i · ΔW_i in place, for entries ``[(PatchModule, w_i)]`` that all touch the weight W
    (as stored: for ``fan_in_fan_out`` modules the update goes to Wᵀ); returns W.

    ``check_finite`` (default on; None reads ``PORTLLM_CHECK_FINITE``, ``portllm.finite``): factors and scales with NaN or
    Inf are refused, and so is a merge that would turn finite weights into NaN or Inf (an fp16 weight
    past 65504, say); ``NonFiniteMergeError`` names the module ``name`` and W is left unchanged.
    ``scratch=True`` says W is the caller's own copy (``port``): it is merged in place and checked
    after (and is then garbage if refused). Otherwise a bound from max|W| and the factors decides
    first; only a merge that might overflow runs on a copy of W, written back if the result is finite.
    """
    prepare_merge(W, entries, backend=backend, check_finite=check_finite, name=name, scratch=scratch,
                  factors_checked=factors_checked)()
    return W


def merge_experts_into(W: torch.Tensor, per_expert: dict[int, Sequence[tuple[PatchModule, float]]], *,
                       backend: str | None = None, check_finite: bool | None = True, name: str = "",
                       scratch: bool = False, factors_checked: bool = False, first: int = 0) -> torch.Tensor:
    """``merge_into`` for every expert e of a fused weight W [E, ., .] at once: ``per_expert[e]`` are the
    entries of expert e's 2-D view W[e]. Planned and checked per expert (``plan_merge``), merged in one
    ``patch_add_experts_`` call when every expert is patched alike (same rank and orientation), with one
    overflow bound for the whole tensor; otherwise expert by expert. ``first``: W is experts
    ``first``, ``first + 1``, ... of the tensor ``name`` (a port's slice), for the errors. Returns W."""
    plans = {e: plan_merge(W[e], entries, backend=backend, check_finite=check_finite, name=f"{name}[{first + e}]",
                           factors_checked=factors_checked)
             for e, entries in sorted(per_expert.items()) if entries}
    p0 = next(iter(plans.values()), None)
    alike = (p0 is not None and len(plans) == W.shape[0]
             and all(p.B.shape == p0.B.shape and p.B.dtype == p0.B.dtype and p.A.dtype == p0.A.dtype
                      and p.fan_in_fan_out == p0.fan_in_fan_out and p.backend == p0.backend
                      for p in plans.values()))
    if not alike:
        return _expert_by_expert(W, per_expert, backend, check_finite, name, scratch, factors_checked, first)
    target = W.transpose(1, 2) if p0.fan_in_fan_out else W
    B = torch.stack([p.B for p in plans.values()])
    A = torch.stack([p.A for p in plans.values()])
    s = torch.stack([p.s for p in plans.values()])
    if p0.check_finite:
        lo, hi = torch.aminmax(W)
        wmax = max(-float(lo), float(hi))
        dmax = float((s.double().abs() * B.abs().amax(1).double() * A.abs().amax(2).double()).sum(1).max())
        if not wmax + dmax * (1 + 1e-3) < torch.finfo(W.dtype).max:  # the bound cannot clear it: expert by expert
            return _expert_by_expert(W, per_expert, backend, True, name, scratch, factors_checked, first)
    ops.patch_add_experts_(target, B, A, s, backend=p0.backend, check_finite=False)
    return W


def _expert_by_expert(W, per_expert, backend, check_finite, name, scratch, factors_checked=False,
                      first=0) -> torch.Tensor:
    """Every expert's merge prepared (checked) first, then all run: a refused expert leaves W unchanged."""
    merges = [prepare_merge(W[e], entries, backend=backend, check_finite=check_finite, name=f"{name}[{first + e}]",
                            scratch=scratch, factors_checked=factors_checked)
              for e, entries in sorted(per_expert.items())]
    for merge in merges:
        merge()
    return W
