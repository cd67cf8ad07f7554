"""Before a merge: does the patch fit this model, and is the model the patch's base or an evolved one?"""

from __future__ import annotations

from dataclasses import dataclass, field

from portllm import fingerprint as fp
from portllm.checkpoint import weight_key, weights
from portllm.patch import Patch


class IncompatiblePatchError(ValueError):
    """The patch does not fit the model: the message names the modules and shapes."""


@dataclass
class CompatReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # patch modules the model lacks
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (module, patch wants, model has)
    is_base: bool | None = None  # None: the patch carries no sketch of its base
    relative_change: dict[str, float] = field(default_factory=dict)  # estimated ‖W − W_base‖/‖W_base‖

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    @property
    def mean_relative_change(self) -> float | None:
        vals = list(self.relative_change.values())
        return sum(vals) / len(vals) if vals else None

    def lines(self) -> list[str]:
        out = [f"{len(self.matched)} patch modules found with matching shapes"]
        for name, want, have in self.mismatched:
            out.append(f"shape mismatch: {name}: the patch needs {tuple(want)}, the model has {tuple(have)}")
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (f", ... ({len(self.missing)} in all)" if len(self.missing) > 5 else "")
            out.append(f"the model lacks {len(self.missing)} patch modules: {shown}")
        if self.is_base is None:
            out.append("base: unknown (the patch holds no fingerprint of the model it was made from)")
        elif self.is_base:
            out.append("base: this model is the patch's own base")
        else:
            out.append(f"base: another model (evolved): weights moved by {self.mean_relative_change:.2%} on average "
                       f"(relative Frobenius norm, estimated), at most {max(self.relative_change.values()):.2%}")
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


def check_compatibility(source, patch: Patch) -> CompatReport:
    """Which patch modules the model (an nn.Module, a checkpoint directory, or a
    checkpoint.Checkpoint / ModelWeights) holds with matching shapes, which it lacks, and whether
    it is the patch's base. Reads only shapes and a few sampled elements per weight."""
    if not hasattr(source, "shape"):
        source = weights(source)
    rep = CompatReport()
    for name, m in patch.items():
        shape = source.shape(weight_key(name))
        if shape is None:
            rep.missing.append(name)
        elif tuple(shape) != m.weight_shape:
            rep.mismatched.append((name, m.weight_shape, tuple(shape)))
        else:
            rep.matched.append(name)
    sketched = [n for n in rep.matched if n in patch.base_sketches]
    if sketched:
        same = True
        for name in sketched:
            sample = source.sample(weight_key(name))
            sk = patch.base_sketches[name]
            same &= fp.same_weights(sk, sample)
            rep.relative_change[name] = fp.relative_change(sk, sample)
        rep.is_base = same
    return rep
