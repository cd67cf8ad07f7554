"""Before a merge: does the patch fit this model, and is the model the patch's base or an evolved one?"""

from __future__ import annotations

from dataclasses import dataclass, field

import json
import os

from torch import nn

from portllm import fingerprint as fp
from portllm.files import open_regular
from portllm.checkpoint import Checkpoint, ModelWeights, tensor_target, weight_key, weights
from portllm.patch import Patch, PatchModule

# transformers architectures whose projections are Conv1D (weights stored [in, out]): there, and
# only there, PEFT honours fan_in_fan_out.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


class IncompatiblePatchError(ValueError):
    """The patch does not fit the model: the message names the modules and shapes."""


@dataclass
class CompatReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # patch modules the model lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (module, patch wants, model has)
    is_base: bool | None = None  # None: the patch carries no sketch of its base, and no base was given
    relative_change: dict[str, float] = field(default_factory=dict)  # estimated ‖W − W_base‖/‖W_base‖
    base_source: str | None = None  # where the base's weights came from: "patch" (its sketches) or a path
    base_hint: str | None = None  # without a base: the patch's base_model_name_or_path, if any
    # LoRA on mixture-of-experts parameters: parameter -> ‖ΔW_e‖_F of each of its experts (all found:
    # an expert the model or checkpoint lacks is refused by name when the patch is resolved onto it)
    expert_norms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    @property
    def mean_relative_change(self) -> float | None:
        vals = list(self.relative_change.values())
        return sum(vals) / len(vals) if vals else None

    def lines(self) -> list[str]:
        out = [f"{len(self.matched)} patch modules found with matching shapes"]
        if self.expert_norms:
            norms = sorted((v, f"{p}[{e}]") for p, vs in self.expert_norms.items() for e, v in enumerate(vs))
            median = norms[len(norms) // 2][0]
            out.append(f"mixture of experts: LoRA on {len(self.expert_norms)} expert parameters, all {len(norms)} "
                       f"experts found; per-expert ‖ΔW‖_F {norms[0][0]:.4g} (smallest, {norms[0][1]}), median "
                       f"{median:.4g}, {norms[-1][0]:.4g} (largest, {norms[-1][1]})")
        for name, want, have in self.mismatched:
            out.append(f"shape mismatch: {name}: the patch needs {tuple(want)}, the model has {tuple(have)}")
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (f", ... ({len(self.missing)} in all)" if len(self.missing) > 5 else "")
            out.append(f"the model lacks {len(self.missing)} patch modules: {shown}")
        against = (f" (measured against the base at {self.base_source})"
                   if self.base_source not in (None, "patch") else "")
        if self.is_base is None:
            named = (f"; its base_model_name_or_path, {self.base_hint!r}, is not a local checkpoint directory"
                     if self.base_hint else "")
            out.append("base: unknown: the patch holds no fingerprint of the model it was made from" + named +
                       ". Whether this model is that base or an evolved one, and how far it moved, cannot be "
                       "told: pass --base DIR (base= in Python), the model the patch was trained on")
        elif self.is_base:
            out.append("base: this model is the patch's own base" + against)
        else:
            out.append(f"base: another model (evolved): weights moved by {self.mean_relative_change:.2%} on average "
                       f"(relative Frobenius norm, estimated), at most {max(self.relative_change.values()):.2%}"
                       + against)
            out.append("how far the weights moved does not tell whether the patch still helps on this model (a "
                       "small move can undo it, a large one leave it whole): `portllm check` (or port --check) predicts it "
                       "from the models' outputs on your task's prompts")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def raise_for_errors(self):
        if self.mismatched:
            name, want, have = self.mismatched[0]
            more = f" (and {len(self.mismatched) - 1} more)" if len(self.mismatched) > 1 else ""
            raise IncompatiblePatchError(f"patch module {name} needs a weight of shape {tuple(want)}, "
                                         f"the model's is {tuple(have)}{more}")
        if self.missing:
            raise IncompatiblePatchError(
                f"the model has no module {self.missing[0]}" +
                (f" (nor {len(self.missing) - 1} other patch modules)" if len(self.missing) > 1 else "") +
                ": is this patch for another architecture?")


def _local_checkpoint(path) -> bool:
    return (isinstance(path, str) and os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and any(f.endswith(".safetensors") for f in os.listdir(path)))


def _base_sketches(base, names: list[str]) -> dict[str, dict]:
    """Sketches (shape and sampled elements) of ``base``'s weights for ``names``, read as a patch's
    own base sketches are: a few elements per weight."""
    src = base if hasattr(base, "shape") else weights(base)
    try:
        out = {}
        for name in names:
            shape = src.shape(weight_key(name))
            if shape is None:
                continue
            sample = src.sample(weight_key(name))
            out[name] = {"shape": list(shape), "sample": sample, "norm": float(sum(v * v for v in sample) ** 0.5)}
        return out
    finally:
        if src is not base and hasattr(src, "close"):
            src.close()


def check_compatibility(source, patch: Patch, base=None) -> CompatReport:
    """Which patch modules the model (an nn.Module, a checkpoint directory, or a
    checkpoint.Checkpoint / ModelWeights) holds with matching shapes, which it lacks, and whether
    it is the patch's base, and how far it moved from it. The base is known from the patch's own
    sketches (patches portllm made), else from ``base`` (the model the patch was trained on: a
    directory or an nn.Module), else from the patch's ``base_model_name_or_path`` where that is a
    local checkpoint directory. Reads only shapes and a few sampled elements per weight."""
    if not hasattr(source, "shape"):
        source = weights(source)
    rep = CompatReport()
    rep.expert_norms = {x.param: x.delta_norms() for x in patch.resolved_experts}
    for name, m in patch.items():
        shape = source.shape(weight_key(name))
        if shape is None:
            rep.missing.append(name)
        elif tuple(shape) != m.weight_shape:
            rep.mismatched.append((name, m.weight_shape, tuple(shape)))
        else:
            rep.matched.append(name)
    sketches = patch.base_sketches
    rep.base_source = "patch" if sketches else None
    if base is None and not sketches and _local_checkpoint(patch.base_model):
        try:  # the patch's own base_model_name_or_path: used if readable, else reported unknown
            sketches = _base_sketches(patch.base_model, rep.matched)
            rep.base_source = patch.base_model
        except (OSError, ValueError):
            sketches = {}
    elif base is not None:  # given explicitly: it is what the user asks to be measured against
        sketches = _base_sketches(base, rep.matched)
        rep.base_source = os.fspath(base) if isinstance(base, (str, os.PathLike)) else type(base).__name__
    if rep.base_source is None:
        rep.base_hint = patch.base_model
    sketched = [n for n in rep.matched if n in sketches]
    if sketched:
        same = True
        for name in sketched:
            sample = source.sample(weight_key(name))
            sk = sketches[name]
            same &= fp.same_weights(sk, sample)
            rep.relative_change[name] = fp.relative_change(sk, sample)
        rep.is_base = same
    return rep


def resolve_fan_in_fan_out(source, patch: Patch) -> Patch:
    """The patch as PEFT merges it into this model. PEFT honours ``fan_in_fan_out`` only on Conv1D
    layers (weights stored [in, out]); on an ``nn.Linear`` it ignores the flag. So a module marked
    fan_in_fan_out that targets an ``nn.Linear`` is merged as W += s·B·A. In a checkpoint directory,
    where module types are not known, the stored shape decides; a square weight, which could be
    either, counts as Conv1D only in the architectures that use Conv1D (config.json's model_type),
    and is otherwise refused (``IncompatiblePatchError``) rather than merged the wrong way round."""
    if not any(m.fan_in_fan_out for m in patch.modules.values()):
        return patch
    if not hasattr(source, "shape"):
        source = weights(source)
    model_type = None
    if isinstance(source, Checkpoint):
        try:
            with open_regular(os.path.join(source.path, "config.json"), "config", binary=False) as f:
                cfg = json.load(f)
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
        except (OSError, ValueError):
            model_type = None
    modules = dict(patch.modules)
    for name, m in patch.modules.items():
        if not m.fan_in_fan_out or tensor_target(weight_key(name))[1] is not None:
            continue  # (an expert's orientation is its experts module's is_transposed: portllm.experts)
        out_f, in_f = m.B.shape[0], m.A.shape[1]
        if isinstance(source, ModelWeights):
            try:
                linear = isinstance(source.model.get_submodule(name), nn.Linear)
            except AttributeError:
                continue  # missing: the compatibility report says so
        else:
            shape = source.shape(weight_key(name))
            if shape is None or tuple(shape) not in ((out_f, in_f), (in_f, out_f)):
                continue  # missing or mismatched: the compatibility report says so
            if out_f != in_f:
                linear = tuple(shape) == (out_f, in_f)
            elif model_type in CONV1D_MODEL_TYPES:
                linear = False
            else:
                raise IncompatiblePatchError(
                    f"patch module {name}: the patch says fan_in_fan_out, which PEFT honours only on Conv1D layers; "
                    f"the weight is square ({out_f}x{in_f}) and the model type ({model_type or 'unknown'}) is not one "
                    f"known to use Conv1D ({', '.join(CONV1D_MODEL_TYPES)}), so portllm cannot tell which way to merge")
        if linear:
            modules[name] = PatchModule(m.B, m.A, m.scale, False)
    return Patch(modules, patch.base_model, patch.base_sketches, patch.source, dict(patch.extra), patch.version,
                 resolved_experts=list(patch.resolved_experts))
