"""``extract_patch`` on mixture-of-experts weights: expert LoRA from a full fine-tune of fused expert
parameters, by a truncated SVD batched over the experts, in PEFT's ``target_parameters`` packing.

For each fused parameter P [E, out, in] (or [E, in, out] where its experts module ``is_transposed``)
that changed, ΔP[e] ≈ B_e·A_e per expert, all of one rank r, packed as PEFT trains them
(``portllm.experts``): lora_A [E·r, in] = A_e stacked, lora_B [out, E·r] with column j·E+e = B_e[:, j].
The result is an adapter PEFT loads with ``target_parameters`` and portllm ports and applies like any
expert LoRA. In a checkpoint directory the parameter's tensors are found as transformers saves them
(``experts.probe_layout``: per expert, split or fused), so the experts' 2-D tensors on disk are not
extracted a second time as plain modules.
"""

from __future__ import annotations

import torch

from portllm.checkpoint import ModelWeights
from portllm.experts import ExpertFactors, ExpertPatchError, meta_model, probe_layout, targets_parameter
from portllm.targets import matches

_CHUNK_BYTES = 256 << 20  # fp32 ΔP of the experts decomposed at once


class _Param:
    """A fused expert parameter to extract: its name, experts, orientation and on-disk layout."""

    def __init__(self, name: str, module: str, shape, transposed: bool, layout: dict):
        self.name, self.module, self.transposed, self.layout = name, module, transposed, layout
        self.E = shape[0]
        self.out_f, self.in_f = (shape[2], shape[1]) if transposed else (shape[1], shape[2])

    def keys(self, src) -> list[str]:
        """The tensors of ``src`` that hold this parameter."""
        return [self.name] if isinstance(src, ModelWeights) or not self.layout else sorted(self.layout)

    def read(self, src, e0: int, e1: int, which: str) -> torch.Tensor:
        """ΔP's operand for experts e0..e1-1 of ``src``, as [experts, out, in] float32."""
        if isinstance(src, ModelWeights) or not self.layout:
            shape = src.shape(self.name)
            want = (self.E, self.in_f, self.out_f) if self.transposed else (self.E, self.out_f, self.in_f)
            if shape is None:
                raise ValueError(f"the {which} model has no {self.name}")
            if tuple(shape) != want:
                raise ValueError(f"{self.name}: the {which} model's is {tuple(shape)}, expected {want}")
            t = src.tensor(self.name)[e0:e1].float()
            return t.transpose(1, 2) if self.transposed else t
        out = torch.zeros(e1 - e0, self.out_f, self.in_f)
        for key, (e, rows) in self.layout.items():
            if not e0 <= e < e1:
                continue
            shape = src.shape(key)
            if shape is None:
                raise ValueError(f"the {which} model has no {key} (part of expert {e} of {self.name})")
            if tuple(shape) != (rows.numel(), self.in_f):
                raise ValueError(f"{key}: the {which} model's is {tuple(shape)}, expected {(rows.numel(), self.in_f)}")
            out[e - e0, rows] = src.tensor(key).float()
        return out


def _structure(base, finetuned, b_src):
    """A model with the inputs' structure (parameter names, experts' orientation, conversion rules):
    one of them if it is a model, else the base checkpoint's model built on the meta device."""
    for m in (base, finetuned):
        if isinstance(m, torch.nn.Module):
            return m
    return meta_model(b_src.path)


def expert_params(base, finetuned, b_src, f_src, target_modules) -> list[_Param]:
    """The fused 3-D parameters to extract (all, or those whose module or ``module.param`` name
    ``target_modules`` names), with their layout in the checkpoints among the inputs."""
    try:
        model = _structure(base, finetuned, b_src)
    except ExpertPatchError:
        return []  # (a checkpoint whose config transformers cannot build: no expert structure to use)
    owners = dict(model.named_modules())
    params = []
    for name, p in model.named_parameters():
        if p.dim() != 3:
            continue
        module = name.rpartition(".")[0]
        if target_modules is not None and not (
                matches(module, target_modules)
                or (not isinstance(target_modules, str) and targets_parameter(name, target_modules))):
            continue
        transposed = bool(getattr(owners.get(module), "is_transposed", False))
        out_rows = p.shape[2] if transposed else p.shape[1]
        layout = {}
        if not all(isinstance(s, ModelWeights) for s in (b_src, f_src)):
            layout = probe_layout(model, name, p.shape[0], out_rows)
            if layout and transposed:
                raise ExpertPatchError(f"{name}: an expert parameter stored transposed ([experts, in, out]) that "
                                       "transformers saves split; portllm extracts transposed experts only stored fused")
        params.append(_Param(name, module, tuple(p.shape), transposed, layout))
    return params


def _lowrank(dP: torch.Tensor, rank, energy, niter: int, seed: int):
    """Per expert of dP [c, m, n]: (B_e [m, q_e], A_e [q_e, n], fraction of ‖ΔP_e‖² kept)."""
    c, m, n = dP.shape
    totals = dP.double().square().sum((1, 2))
    if rank is not None:
        q = min(rank, m, n)
        with torch.random.fork_rng(devices=[dP.device] if dP.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(dP, q=min(q + 8, m, n), niter=niter)
        U, S, Vh = U[..., :q], S[:, :q], V[..., :q].transpose(1, 2)
        qs = [q] * c
    else:
        U, S, Vh = torch.linalg.svd(dP, full_matrices=False)
        frac = torch.cumsum(S.double() ** 2, 1) / totals.clamp_min(1e-300)[:, None]
        target = torch.full((c, 1), energy, dtype=torch.float64, device=frac.device)
        qs = [min(int(k) + 1, S.shape[1]) for k in torch.searchsorted(frac.contiguous(), target)[:, 0].tolist()]
    out = []
    for e in range(c):
        total = float(totals[e])
        q = qs[e] if total > 0 else 0
        kept = float((S[e, :q].double() ** 2).sum() / total) if total > 0 else 1.0
        out.append(((U[e, :, :q] * S[e, :q]).cpu(), Vh[e, :q].cpu(), kept))
    return out


def extract_experts(params: list[_Param], b_src, f_src, rank, energy, *, device, niter: int, seed: int,
                    dtype: torch.dtype, min_change: float, bar=None):
    """(expert_factors, expert_config, energy kept per ``"P[e]"``) for the parameters that changed."""
    factors, ranks, kept = {}, {}, {}
    for x in params:
        per = max(1, _CHUNK_BYTES // max(1, 8 * x.out_f * x.in_f))
        experts, change, size = [], 0.0, 0.0
        for e0 in range(0, x.E, per):
            e1 = min(x.E, e0 + per)
            Wb = x.read(b_src, e0, e1, "base").to(device)
            dP = x.read(f_src, e0, e1, "fine-tuned").to(device) - Wb
            change += float(dP.double().square().sum())
            size += float(Wb.double().square().sum())
            experts += _lowrank(dP, rank, energy, niter, seed)
            del Wb, dP
        if bar is not None:
            bar.update(1)
        if change == 0.0 or change <= min_change ** 2 * size:
            continue
        r = max(1, max(B.shape[1] for B, _, _ in experts))
        B = torch.zeros(x.out_f, r, x.E, dtype=dtype)
        A = torch.zeros(x.E, r, x.in_f, dtype=dtype)
        for e, (Be, Ae, k) in enumerate(experts):
            B[:, : Be.shape[1], e] = Be
            A[e, : Ae.shape[0]] = Ae
            kept[f"{x.name}[{e}]"] = k
        ranks[x.name] = r
        factors[x.name] = (x.module, B.reshape(x.out_f, r * x.E), A.reshape(x.E * r, x.in_f))
    # PEFT nests the wrappers of several parameters of one module: the last in registration order
    # (params' order) is saved under the module, the one before under module.base_layer, and so on.
    expert_factors = {}
    for module in dict.fromkeys(m for m, _, _ in factors.values()):
        names = [x.name for x in params if x.name in factors and x.module == module]
        for depth, name in enumerate(reversed(names)):
            key = module + ".base_layer" * depth
            expert_factors[key] = ExpertFactors(key, factors[name][1], factors[name][2])
    if not factors:
        return {}, {}, kept
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {"target_parameters": sorted(factors), "r": r, "lora_alpha": r,
              "rank_pattern": {n: q for n, q in ranks.items() if q != r},
              "alpha_pattern": {n: q for n, q in ranks.items() if q != r}, "use_rslora": False}
    return expert_factors, config, kept
