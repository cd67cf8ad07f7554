"""The port into an MXFP4 checkpoint (``quant_method: "mxfp4"``, GPT-OSS): the expert parameters a patch
reaches are stored packed (``P_blocks``, ``P_scales``; ``portllm.mxfp4``), merged one expert at a time,
and written back packed: in chunks of experts where the blocks come before the scales in the file (the
new scales, a sixteenth of the bytes, held until their turn), whole otherwise; everything else
(attention, in bf16) goes through the port as usual.

The patch reaches them as the modules ``"P_blocks[e]"`` (``portllm.experts``). What survives
requantization is summed per parameter and in total; a port that keeps less than half of the patch
is refused, with nothing written, unless asked for (``allow_low_retention``), and the refusal says
how much the other rounding keeps.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from portllm import mxfp4
from portllm.checkpoint import Checkpoint, tensor_target, weight_key
from portllm.compat import IncompatiblePatchError
from portllm.fp8 import Retention
from portllm.patch import Patch

MIN_RETAINED = 0.5


class LowRetentionError(IncompatiblePatchError):
    """Less than half of the patch survived requantization; nothing was written."""


class MXFP4Checkpoint:
    """config.json's ``quantization_config`` with ``quant_method: "mxfp4"``."""

    key = "mxfp4"

    def describe(self) -> str:
        return "MXFP4 (e2m1 codes, an e8m0 scale per 32)"

    def split(self, ckpt: Checkpoint, patch: Patch):
        return split(ckpt, patch)

    def merges(self, ckpt: Checkpoint, targets: dict, **kw) -> "MXFP4Merges":
        return MXFP4Merges(ckpt, targets, **kw)


def split(ckpt: Checkpoint, patch: Patch) -> tuple[Patch, dict[str, dict[int, object]]]:
    """(the patch without its MXFP4 experts, {parameter: {expert: PatchModule}}), every packed pair
    checked (layout, scales, the factors' shapes) before any write; IncompatiblePatchError naming the
    tensor otherwise."""
    keys = set(ckpt.keys())
    targets: dict[str, dict[int, object]] = {}
    rest = {}
    for name, m in patch.items():
        key, index = tensor_target(weight_key(name))
        if index is None or not key.endswith("_blocks") or key not in keys:
            rest[name] = m
            continue
        targets.setdefault(key[: -len("_blocks")], {})[index] = m
    for p, mods in targets.items():
        info = ckpt.info(p + "_blocks")
        if p + "_scales" not in keys:
            raise IncompatiblePatchError(f"tensor {p}_blocks: the checkpoint has no {p}_scales beside it")
        try:
            mxfp4.check(p, info.shape, info.dtype, ckpt.tensor(p + "_scales"))
        except mxfp4.MXFP4FormatError as e:
            raise IncompatiblePatchError(str(e)) from None
        E, R, G, _ = info.shape
        for e, m in mods.items():
            if not 0 <= e < E or m.weight_shape != (R, G * mxfp4.GROUP):
                raise IncompatiblePatchError(
                    f"module {p}_blocks[{e}]: an update of {m.weight_shape[0]}x{m.weight_shape[1]} for expert {e} "
                    f"of {p}_blocks {tuple(info.shape)} ({E} experts of {R}x{G * mxfp4.GROUP})")
    return dataclasses.replace(patch, modules=rest), targets


class MXFP4Merges:
    """The packed parameters a port merges into (``requant`` of ``port_stream.write_weights``): streamed
    ones chunk by chunk (``streamed``, ``rows``); the others whole, blocks and scales computed when the
    first of the two comes up in file order (the other read out of order) and handed out in turn. The
    retention is summed per parameter."""

    label, unit, fmt_key = "MXFP4", "expert parameters", "mxfp4"

    def __init__(self, ckpt: Checkpoint, targets: dict, *, policy: str, on_clip: str, rounding: str, seed: int,
                 backend: str | None):
        self.ckpt, self.targets = ckpt, targets
        self.policy, self.on_clip, self.rounding, self.seed, self.backend = policy, on_clip, rounding, seed, backend
        self.keys = {p + suffix: p for p in targets for suffix in ("_blocks", "_scales")}
        self.pending: dict[str, torch.Tensor] = {}
        self.kept: dict[str, Retention] = {}
        self.other: dict[str, Retention] = {}
        self.rescaled: dict[str, tuple[int, list[int]]] = {}
        self.stream: dict[str, torch.Tensor] = {}  # streamed parameter -> its new scales, filled chunk by chunk

    def owns(self, key: str) -> bool:
        return key in self.keys

    def _merge(self, p: str, blocks: torch.Tensor, scales: torch.Tensor, lo: int = 0) -> mxfp4.MergeResult:
        """Experts lo.. of parameter p (the given slices), merged; the retention added to p's."""
        factors = {e - lo: (m.B, m.A, m.scale) for e, m in self.targets[p].items() if lo <= e < lo + blocks.shape[0]}
        # Each tensor's stream from the seed and its own name (not from file order), as the FP8 port.
        seed = zlib.crc32(f"{self.seed}|{p}_blocks".encode())
        res = mxfp4.merge_(blocks, scales, factors, policy=self.policy, on_clip=self.on_clip, rounding=self.rounding,
                           seed=seed, backend=self.backend, name=p, first_expert=lo)
        self.kept.setdefault(p, Retention()).add(res.kept)
        self.other.setdefault(p, Retention()).add(res.other)
        if res.rescaled_count:
            n, first = self.rescaled.get(p, (0, []))
            self.rescaled[p] = (n + res.rescaled_count, (first + res.rescaled)[:8])
        return res

    def streamed(self, order: list[str]) -> set[str]:
        """Of the blocks tensors, those that come before their scales in ``order`` (the port's write
        order): merged chunk by chunk of experts (``rows``), their new scales held until their turn."""
        where = {k: i for i, k in enumerate(order)}
        out = set()
        for p in self.targets:
            if 0 <= where.get(p + "_blocks", -1) < where.get(p + "_scales", -1):
                out.add(p + "_blocks")
        return out

    def rows(self, key: str, lo: int, hi: int, t: torch.Tensor) -> torch.Tensor:
        """Experts lo:hi of a streamed blocks tensor (``t``, as read), merged: their new blocks."""
        p = self.keys[key]
        if p not in self.stream:  # (one parameter's scales held at a time: allocated at its first chunk)
            self.stream[p] = self.ckpt.tensor(p + "_scales")
        res = self._merge(p, t, self.stream[p][lo:hi].clone(), lo)
        self.stream[p][lo:hi] = res.scales  # (the new bytes replace the ones read, chunk by chunk)
        return res.blocks

    def result(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        p = self.keys[key]
        if p in self.stream:  # its blocks went by in chunks: these are its new scales
            return self.stream.pop(p)
        blocks = t if key.endswith("_blocks") else self.ckpt.tensor(p + "_blocks")
        scales = t if key.endswith("_scales") else self.ckpt.tensor(p + "_scales")
        res = self._merge(p, blocks, scales)
        if key.endswith("_blocks"):
            self.pending[p + "_scales"] = res.scales
            return res.blocks
        self.pending[p + "_blocks"] = res.blocks
        return res.scales

    @staticmethod
    def _total(stats: dict[str, Retention]) -> Retention:
        tot = Retention()
        for st in stats.values():
            tot.add(st)
        return tot

    @property
    def other_rounding(self) -> str:
        return "nearest" if self.rounding == "stochastic" else "stochastic"

    def summary(self) -> dict:
        kept, other = self._total(self.kept), self._total(self.other)
        return {"format": self.fmt_key, "rounding": self.rounding, "seed": self.seed, "scales": self.policy,
                "on_clip": self.on_clip, "retained": kept.retained, "noise": kept.noise,
                self.other_rounding: {"retained": other.retained, "noise": other.noise},
                "rescaled_blocks": {p: n for p, (n, _) in self.rescaled.items()},
                "parameters": {p: {"retained": st.retained, "noise": st.noise,
                                   self.other_rounding: {"retained": self.other[p].retained,
                                                         "noise": self.other[p].noise}}
                               for p, st in self.kept.items()}}

    def lines(self) -> list[str]:
        if not self.kept:
            return [f"{self.label}: nothing merged"]
        kept, other = self._total(self.kept), self._total(self.other)
        worst = min(self.kept.items(), key=lambda kv: kv[1].retained)
        out = [f"{self.label} ({self.rounding} rounding, scales {self.policy}): {kept.retained:.1%} of the patch "
               f"survived requantization over {len(self.kept)} {self.unit} (noise {kept.noise:.2f} of the patch's "
               f"norm); least: {worst[0]} {worst[1].retained:.1%}; {self.other_rounding} rounding would keep "
               f"{other.retained:.1%} (noise {other.noise:.2f})"]
        for p, (n, first) in sorted(self.rescaled.items()):
            out.append(self._rescaled_line(p, n, first))
        return out

    def _rescaled_line(self, p: str, n: int, first: list[int]) -> str:
        G = self.ckpt.info(p + "_scales").shape[2]
        R = self.ckpt.info(p + "_scales").shape[1]
        e, rest = divmod(first[0], R * G)
        return (f"MXFP4: {n} block(s) of {p}_blocks did not fit their scale after the merge and were rescaled as "
                f"the format's quantizer would (first: expert {e}, row {rest // G}, columns "
                f"{rest % G * mxfp4.GROUP}:{rest % G * mxfp4.GROUP + mxfp4.GROUP})")

    def check_retention(self, allow: bool):
        """LowRetentionError unless at least half of the patch survived (or ``allow``)."""
        kept, other = self._total(self.kept), self._total(self.other)
        if allow or not self.kept or kept.retained >= MIN_RETAINED:
            return
        hint = (f"; {self.other_rounding} rounding would keep {other.retained:.1%} (noise {other.noise:.2f}): "
                f"port with --rounding {self.other_rounding}" if other.retained > kept.retained else "")
        raise LowRetentionError(
            f"{self.label} ({self.rounding} rounding, scales {self.policy}): only {kept.retained:.1%} of the patch survived "
            f"requantization (noise {kept.noise:.2f} of its norm){hint}; nothing written (pass "
            "--allow-low-retention, or allow_low_retention=True, to write it anyway)")
