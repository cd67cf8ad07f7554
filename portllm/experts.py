"""LoRA on mixture-of-experts weights: PEFT's ``target_parameters`` adapters, mapped onto the tensors a
model or a checkpoint holds, exactly as PEFT merges them.

transformers 5 holds a layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I]; GPT-OSS stores them transposed, [E, in, out], and says so
with the experts module's ``is_transposed``). PEFT (``tuners/lora/layer.py``, ``ParamWrapper``)
trains LoRA on such a parameter as one pair, lora_A [E·r, in] and lora_B [out, E·r], and merges

    ΔP[e] = s · B[:, e::E] · A[e·r:(e+1)·r]      ([out, in]; its transpose for is_transposed)

(``get_delta_weight``: A reshaped (E, r, in), B reshaped (out, r, E): the expert index is the
slowest in A and the fastest in B). Several parameters of one module are nested wrappers, saved as
``<module>.lora_A.weight`` for the last parameter in the module's registration order,
``<module>.base_layer.lora_A.weight`` for the one before, and so on; rank_pattern and alpha_pattern
match ``<module>.<parameter>``.

A patch keeps these factors as read (``Patch.expert_factors``) and resolves them here against the
model they apply to:

* in memory (``for_model``): expert e of parameter P is the 2-D view ``P[e]``, addressed by the
  indexed name ``"P[e]"`` (``portllm.checkpoint.tensor_target``);
* on disk (``for_checkpoint``): the checkpoint's own tensors, found by running transformers' own
  save-side conversion (``revert_weight_conversion``, the rules ``from_pretrained`` reverses) on a
  probe that numbers the rows of P, so that each on-disk tensor is known to hold rows ``rows`` of
  expert ``e``: its update is ``s · B[rows, e::E] · A[e·r:(e+1)·r]``. A checkpoint that stores
  the fused parameter itself gets the indexed names; one that stores it as MXFP4 (``P_blocks`` and
  ``P_scales``, GPT-OSS) gets ``"P_blocks[e]"``, merged by ``portllm.port_mxfp4``.

Nothing is guessed from names: the parameter a factor pair belongs to is the model's own
registration order, its orientation the experts module's ``is_transposed``, and the on-disk layout
transformers' conversion rules.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

_BASE = ".base_layer"


class ExpertPatchError(ValueError):
    """An expert adapter that cannot be mapped onto this model or checkpoint; the message names the tensor."""


@dataclass
class ExpertFactors:
    """The factor pair PEFT saved under ``key`` (a module path, with one ``.base_layer`` per level of
    nesting), before it is known which parameter of the module it trains."""

    key: str
    B: torch.Tensor  # [out, E·r]
    A: torch.Tensor  # [E·r, in]

    @property
    def module(self) -> str:
        k = self.key
        while k.endswith(_BASE):
            k = k[: -len(_BASE)]
        return k

    @property
    def depth(self) -> int:
        return (len(self.key) - len(self.module)) // len(_BASE)


@dataclass
class ExpertLoRA:
    """One parameter's expert LoRA, resolved: ``param`` [E, out, in] (or [E, in, out] if ``transposed``)."""

    param: str
    num_experts: int
    B: torch.Tensor  # [out, E·r]
    A: torch.Tensor  # [E·r, in]
    scale: float
    transposed: bool

    @property
    def rank(self) -> int:
        return self.A.shape[0] // self.num_experts

    @property
    def plain(self) -> bool:
        """A LoRA on a plain layer's 2-D weight through target_parameters (PEFT merges it as a Linear)."""
        return self.num_experts == 1 and self.param.endswith(".weight")

    def delta_norms(self) -> list[float]:
        """‖ΔW_e‖_F = |s|·‖B_e·A_e‖_F per expert, from r×r and r×in products only (no out×in temporary)."""
        E, r = self.num_experts, self.rank
        B = self.B.double().reshape(self.B.shape[0], r, E).permute(2, 0, 1)  # [E, out, r]: B_e
        A = self.A.double().reshape(E, r, self.A.shape[1])  # [E, r, in]: A_e
        sq = ((B.transpose(1, 2) @ B @ A) * A).sum((1, 2)).clamp_min(0)
        return (abs(self.scale) * sq.sqrt()).tolist()

    def factors(self, e: int, rows: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (B_e [out, r], A_e [r, in]), PEFT's packing; ``rows`` selects output rows of B_e."""
        B = self.B[:, e::self.num_experts]
        if rows is not None:
            B = B[rows]
        return B, self.A[e * self.rank:(e + 1) * self.rank]


def targets_parameter(name: str, target_parameters) -> bool:
    """PEFT's rule for ``target_parameters``: the full ``module.param`` name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in target_parameters)


def is_expert_key(module: str, target_parameters, target_modules=None) -> bool:
    """Whether PEFT's saved module path ``module`` holds the factors of a parameter LoRA: it is nested
    (``.base_layer``), or its module (the path itself) is one that an entry of ``target_parameters``
    reaches a parameter of: ``owner.param`` names the owner; a bare parameter name may be held by any
    module, so then it is a parameter LoRA unless ``target_modules`` names the module itself."""
    from portllm.targets import matches

    if module.endswith(_BASE):
        return True
    for t in target_parameters:
        owner = t.rpartition(".")[0]
        if owner and (module == owner or module.endswith("." + owner)):
            return True
        if not owner and not (target_modules and matches(module, target_modules)):
            return True
    return False


def _pattern(patterns, name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve(expert_factors: dict[str, ExpertFactors], config: dict, model: torch.nn.Module,
            scale_factor: float = 1.0) -> list[ExpertLoRA]:
    """Each saved factor pair's parameter in ``model`` (a real model, or one built on the meta device),
    its number of experts, orientation and scale (times ``scale_factor``), checked against the
    parameter's shape."""
    targets = list(config.get("target_parameters") or [])
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora"))
    modules = dict(model.named_modules())
    out = []
    for key, f in sorted(expert_factors.items()):
        mod = modules.get(f.module)
        if mod is None:
            raise ExpertPatchError(f"expert adapter tensor {key}.lora_A.weight: the model has no module {f.module}")
        wrapped = [(n, p) for n, p in mod.named_parameters(recurse=False)
                   if targets_parameter(f"{f.module}.{n}", targets)]
        if f.depth >= len(wrapped):
            raise ExpertPatchError(f"expert adapter tensor {key}.lora_A.weight: module {f.module} has "
                                   f"{len(wrapped)} targeted parameter(s) ({', '.join(n for n, _ in wrapped) or 'none'}), "
                                   f"but the key is nested {f.depth} deep")
        pname, p = wrapped[len(wrapped) - 1 - f.depth]  # the last registered parameter is the outermost wrapper
        full = f"{f.module}.{pname}"
        if p.dim() == 2 and pname == "weight":  # a plain layer's weight (DeepSeek's shared experts): one "expert"
            E, transposed, (n_out, n_in) = 1, False, p.shape
        elif p.dim() == 3:
            E = p.shape[0]
            transposed = bool(getattr(mod, "is_transposed", False))
            n_in, n_out = (p.shape[1], p.shape[2]) if transposed else (p.shape[2], p.shape[1])
        else:
            raise ExpertPatchError(f"adapter for parameter {full} {tuple(p.shape)}: portllm merges LoRA on 3-D expert "
                                   "parameters [experts, ., .] and on a layer's 2-D weight")
        r = int(_pattern(config.get("rank_pattern"), full, r_default))
        alpha = float(_pattern(config.get("alpha_pattern"), full, alpha_default))
        if f.A.shape != (E * r, n_in) or f.B.shape != (n_out, E * r):
            raise ExpertPatchError(
                f"expert adapter for {full} {tuple(p.shape)} ({E} experts, rank {r}): lora_A {tuple(f.A.shape)} and "
                f"lora_B {tuple(f.B.shape)} are not [E·r, in] = {(E * r, n_in)} and [out, E·r] = {(n_out, E * r)}")
        scale = (alpha / math.sqrt(r) if rslora else alpha / r) * scale_factor
        out.append(ExpertLoRA(full, E, f.B, f.A, scale, transposed))
    return out


def for_model(experts: list[ExpertLoRA]) -> dict:
    """Patch modules for an in-memory model: expert e of P is the 2-D view P[e], named ``"P[e]"``."""
    from portllm.patch import PatchModule

    mods = {}
    for x in experts:
        if x.plain:
            mods[x.param[: -len(".weight")]] = PatchModule(x.B, x.A, x.scale)
            continue
        for e in range(x.num_experts):
            B, A = x.factors(e)
            mods[f"{x.param}[{e}]"] = PatchModule(B, A, x.scale, fan_in_fan_out=x.transposed)
    return mods


def meta_model(checkpoint_dir: str) -> torch.nn.Module:
    """The checkpoint's model built on the meta device from its config.json (no weights read, no memory),
    for its structure: parameter names, registration order, experts' orientation, conversion rules."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - transformers is a dependency of the expert path
        raise ExpertPatchError(f"mapping expert LoRA onto a checkpoint needs transformers ({e})") from None
    from portllm.files import open_regular

    cfg_path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open_regular(cfg_path, "config", binary=False) as fh:  # (a regular file: never a FIFO that blocks)
            json.load(fh)
        config = AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ExpertPatchError(f"{cfg_path}: cannot build the model it describes, to map expert LoRA onto the "
                               f"checkpoint ({e})") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ExpertPatchError(f"{cfg_path}: model_type {getattr(config, 'model_type', '?')!r} is not a causal "
                                   f"LM transformers can build ({e})") from None


def probe_layout(model: torch.nn.Module, param: str, E: int, out_rows: int) -> dict[str, tuple[int, torch.Tensor]]:
    """On-disk key -> (expert, rows of P[e]) for the fused parameter ``param`` [E, out_rows, .], by
    transformers' save-side conversion applied to a probe [E, out_rows, 1] numbering the rows; {} where
    the checkpoint stores the parameter itself, as held in memory."""
    from transformers.core_model_loading import revert_weight_conversion

    probe = torch.arange(E * out_rows, dtype=torch.float64).reshape(E, out_rows, 1)
    x = ExpertLoRA(param, E, probe, probe, 1.0, False)  # (for the messages: x.param)
    saved = revert_weight_conversion(model, {param: probe})
    layout = {}
    for key, t in saved.items():
        t = t.detach()
        if key == x.param and t.shape == probe.shape:
            if torch.equal(t, probe):
                return {}  # stored fused, as in memory: the indexed names apply
            raise ExpertPatchError(f"{x.param}: transformers saves it under the same name with its rows moved, a "
                                   "layout portllm cannot map expert LoRA onto")
        if key == x.param:
            raise ExpertPatchError(f"{x.param}: transformers saves it transformed ({tuple(t.shape)} for a probe "
                                   f"{tuple(probe.shape)}: transposed?), a layout portllm cannot map expert LoRA onto")
        if t.dim() != 2 or t.shape[1] != 1:
            raise ExpertPatchError(f"{x.param}: transformers saves it as {key} {tuple(t.shape)}, a layout portllm "
                                   "cannot map expert LoRA onto (not whole rows of one expert)")
        ids = t[:, 0].to(torch.int64)
        e = int(ids[0]) // out_rows
        rows = ids - e * out_rows
        if bool((ids // out_rows != e).any()):
            raise ExpertPatchError(f"{x.param}: transformers saves {key} with rows of several experts; portllm "
                                   "cannot map expert LoRA onto it")
        layout[key] = (e, rows)
    return layout


def for_checkpoint(experts: list[ExpertLoRA], model: torch.nn.Module, keys) -> dict:
    """Patch modules for a checkpoint holding ``keys``: per on-disk tensor (per expert, or a part of
    one expert's fused rows, as transformers saves the model), or indexed names where it stores the
    fused parameter itself."""
    from portllm.patch import PatchModule

    keys = set(keys)
    mods = {}
    for x in experts:
        if x.plain:
            mods.update(for_model([x]))
            continue
        # Never from the name alone: transformers' rules say whether the fused name on disk is the
        # fused tensor as held in memory (some families store it under the same name transposed).
        layout = probe_layout(model, x.param, x.num_experts, x.B.shape[0])
        if not layout:
            if x.param not in keys and x.param + "_blocks" in keys:
                mods.update(_packed(x))
                continue
            if x.param not in keys:
                raise ExpertPatchError(f"{x.param}: the checkpoint holds no tensor {x.param}")
            mods.update(for_model([x]))
            continue
        if x.transposed:
            raise ExpertPatchError(f"{x.param}: an expert parameter stored transposed ([experts, in, out]) that "
                                   "transformers saves split; portllm maps transposed experts only stored fused")
        missing = sorted(k for k in layout if k not in keys)
        if missing:
            raise ExpertPatchError(f"{x.param}: the checkpoint lacks {missing[0]} (one of {len(layout)} tensors "
                                   "transformers saves this expert parameter as)")
        for key, (e, rows) in layout.items():
            if not key.endswith(".weight"):
                raise ExpertPatchError(f"{x.param}: transformers saves it as {key}, which is not a module's weight")
            contiguous = bool((rows == torch.arange(int(rows[0]), int(rows[0]) + rows.numel())).all())
            sel = slice(int(rows[0]), int(rows[0]) + rows.numel()) if contiguous else rows
            B, A = x.factors(e, sel)
            mods[key[: -len(".weight")]] = PatchModule(B, A, x.scale)
    return mods


def _packed(x: ExpertLoRA) -> dict:
    """Patch modules ``"P_blocks[e]"`` for a parameter stored packed as MXFP4 (``P_blocks`` [E, out, in/32,
    16], ``portllm.mxfp4``): transformers dequantizes it to [E, out, in] and transposes that into the
    [E, in, out] parameter, so expert e's update B_e·A_e applies to the stored [out, in] untransposed."""
    from portllm.patch import PatchModule

    if not x.transposed:
        raise ExpertPatchError(f"{x.param}: stored as MXFP4 blocks ({x.param}_blocks) for a parameter held "
                               "[experts, out, in]; portllm merges into MXFP4 experts held [experts, in, out] "
                               "(GPT-OSS's layout) only")
    mods = {}
    for e in range(x.num_experts):
        B, A = x.factors(e)
        mods[f"{x.param}_blocks[{e}]"] = PatchModule(B, A, x.scale)
    return mods
