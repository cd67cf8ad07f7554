"""The port into an NVFP4 checkpoint (compressed-tensors' ``nvfp4-pack-quantized``; ``portllm.nvfp4``):
the Linear weights a patch reaches are stored packed (``X.weight_packed``, ``X.weight_scale``,
``X.weight_global_scale``), merged whole, and written back packed; everything else goes through the
port as usual. The report and the refusal of a port that keeps less than half of the patch are the
MXFP4 port's (``portllm.port_mxfp4``).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from portllm import nvfp4
from portllm.checkpoint import Checkpoint
from portllm.compat import IncompatiblePatchError
from portllm.fp8 import Retention
from portllm.patch import Patch
from portllm.port_mxfp4 import MXFP4Merges

PARTS = (".weight_packed", ".weight_scale", ".weight_global_scale")


class NVFP4Checkpoint:
    """config.json's ``quantization_config``: compressed-tensors, format ``nvfp4-pack-quantized``."""

    key = "nvfp4"

    def describe(self) -> str:
        return "NVFP4 (e2m1 codes, an e4m3 scale per 16, a global fp32 scale)"

    def split(self, ckpt: Checkpoint, patch: Patch):
        return split(ckpt, patch)

    def merges(self, ckpt: Checkpoint, targets: dict, **kw) -> "NVFP4Merges":
        return NVFP4Merges(ckpt, targets, **kw)


def split(ckpt: Checkpoint, patch: Patch) -> tuple[Patch, dict[str, object]]:
    """(the patch without its NVFP4 modules, {module: PatchModule}), every packed weight checked (layout,
    scales, the factors' shapes) before any write; IncompatiblePatchError naming the tensor otherwise."""
    keys = set(ckpt.keys())
    targets, rest = {}, {}
    for name, m in patch.items():
        if name + ".weight_packed" not in keys:
            rest[name] = m
            continue
        for part in PARTS[1:]:
            if name + part not in keys:
                raise IncompatiblePatchError(f"tensor {name}.weight_packed: the checkpoint has no {name}{part} beside it")
        info = ckpt.info(name + ".weight_packed")
        try:
            nvfp4.check(name, info.shape, info.dtype, ckpt.tensor(name + ".weight_scale"),
                        ckpt.tensor(name + ".weight_global_scale"))
        except nvfp4.NVFP4FormatError as e:
            raise IncompatiblePatchError(str(e)) from None
        shape = (info.shape[0], info.shape[1] * 2)
        if m.fan_in_fan_out or m.weight_shape != shape:
            raise IncompatiblePatchError(
                f"module {name}: an update of {m.weight_shape[0]}x{m.weight_shape[1]}"
                f"{' (fan_in_fan_out)' if m.fan_in_fan_out else ''} for the NVFP4 weight {name}.weight_packed "
                f"{tuple(info.shape)} ({shape[0]}x{shape[1]}, stored [out, in])")
        targets[name] = m
    return dataclasses.replace(patch, modules=rest), targets


class NVFP4Merges(MXFP4Merges):
    """The NVFP4 weights a port merges into (``requant`` of ``port_stream.write_weights``): each weight's
    three tensors computed when the first of them comes up in file order (the others read out of
    order) and handed out in turn; the retention summed per module."""

    label, unit, fmt_key = "NVFP4", "weights", "nvfp4"

    def __init__(self, ckpt: Checkpoint, targets: dict, *, policy: str, on_clip: str, rounding: str, seed: int,
                 backend: str | None):
        super().__init__(ckpt, targets, policy=policy, on_clip=on_clip, rounding=rounding, seed=seed,
                         backend=backend)
        self.keys = {name + part: name for name in targets for part in PARTS}
        self.refreshed: list[str] = []

    def streamed(self, order: list[str]) -> set[str]:
        return set()

    def result(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        name = self.keys[key]
        parts = {part: (t if key == name + part else self.ckpt.tensor(name + part)) for part in PARTS}
        m = self.targets[name]
        # Each weight's stream from the seed and its own name (not from file order), as the other ports.
        seed = zlib.crc32(f"{self.seed}|{name}.weight_packed".encode())
        res = nvfp4.merge_(parts[".weight_packed"], parts[".weight_scale"], parts[".weight_global_scale"], m.B, m.A,
                           m.scale, policy=self.policy, on_clip=self.on_clip, rounding=self.rounding, seed=seed,
                           name=name)
        self.kept.setdefault(name, Retention()).add(res.kept)
        self.other.setdefault(name, Retention()).add(res.other)
        if res.refreshed:
            self.refreshed.append(name)
        elif res.rescaled_count:
            self.rescaled[name] = (res.rescaled_count, res.rescaled)
        new = {".weight_packed": res.blocks, ".weight_scale": res.scales, ".weight_global_scale": res.global_scale}
        for part, v in new.items():
            if key != name + part:
                self.pending[name + part] = v
        return new[key[len(name):]]

    def summary(self) -> dict:
        return {**super().summary(), "refreshed": list(self.refreshed)}

    def lines(self) -> list[str]:
        out = super().lines()
        if self.refreshed:
            out.append(f"NVFP4: {len(self.refreshed)} weight(s) outgrew their global scale after the merge (a group "
                       "did not fit even e4m3's largest scale) and were requantized fresh, with a new global scale "
                       f"and every group's scale: {', '.join(self.refreshed[:4])}"
                       + (", ..." if len(self.refreshed) > 4 else ""))
        return out

    def _rescaled_line(self, p: str, n: int, first: list[int]) -> str:
        G = self.ckpt.info(p + ".weight_scale").shape[1]
        r, c = divmod(first[0], G)
        return (f"NVFP4: {n} group(s) of {p}.weight_packed did not fit their scale after the merge and were rescaled "
                f"as the format's quantizer would, under the weight's global scale (first: row {r}, columns "
                f"{c * nvfp4.GROUP}:{(c + 1) * nvfp4.GROUP})")
