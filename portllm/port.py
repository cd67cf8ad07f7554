"""``port``: stream a checkpoint directory through patch_add_, tensor by tensor, into a new one.

Memory stays at a few chunks of rows whatever the model's size (``portllm.port_stream``): tensors
the patch leaves alone are read straight into the output's write buffer; patched ones are read,
merged on the chosen device and written chunk by chunk, the three stages overlapped. The result is written
into a temporary directory beside ``out_dir`` and renamed at the end, so an interrupted port never
leaves a half-written model that looks complete; ``model_dir`` is only ever read.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
import zlib
from dataclasses import dataclass

import torch

from portllm import finite, fp8, fp8_formats, mxfp4, ops
from portllm.atomic import UnsafePathError, check_disjoint, staging_dir, write_json
from portllm.checkpoint import INDEX, Checkpoint, tensor_target, weight_key
from portllm.compat import CompatReport, IncompatiblePatchError, check_compatibility, resolve_fan_in_fan_out
from portllm.experts import ExpertPatchError
from portllm.files import (InputWatch, NotARegularFileError, copy_file, copy_tree, kind, link_scope, open_regular,
                           within)
from portllm.merge import NonFiniteMergeError, check_weight_dtype
from portllm.patch import Patch
from portllm.port_mxfp4 import MXFP4Checkpoint
from portllm.port_nvfp4 import NVFP4Checkpoint
from portllm.port_stream import write_weights

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
           "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class PortResult:
    out_dir: str
    report: CompatReport
    tensors: int
    merged: int
    bytes_written: int
    seconds: float
    device: str
    peak_device_bytes: int | None  # CUDA: peak allocated during the port; None on CPU
    skipped_links: list[str] | None = None  # links in the model directory that were not followed (not copied)


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {str(dtype).removeprefix('torch.')}: portllm writes bfloat16, float16 or float32 "
                             "weights (an FP8 checkpoint keeps its own format when dtype is left out)")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of bfloat16, float16, float32")
    return _DTYPES[dtype]


def _check_out_dir(out_dir: str, inputs: dict[str, str], force: bool):
    """The output is never an input, inside one, or a parent of one (after resolving symlinks); an
    existing non-empty output is replaced only with ``force``."""
    check_disjoint(out_dir, inputs)
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not force:
            raise FileExistsError(f"{out_dir} exists and is not empty (use --force / force=True to replace it)")


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                         "(use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return dev


def port(model_dir: str, patch: Patch | str, out_dir: str, scale: float = 1.0, device: str | None = None,
         dtype=None, *, force: bool = False, backend: str | None = None, check_finite: bool = True,
         progress: bool = True, log=print, base: str | None = None, rounding: str = "nearest",
         seed: int = 0, fp4_scales: str = "reuse", fp4_clip: str = "rescale",
         allow_low_retention: bool = False, dry_run: bool = False) -> PortResult:
    """Writes ``model_dir`` with ``W += scale · ΔW`` merged into every patch module, to ``out_dir``.

    * ``patch``: a Patch or a path to one (PEFT adapter directory).
    * ``device``: where merges run ("cpu", "cuda", ...; default: cuda if available, else cpu).
    * ``dtype``: convert every floating-point tensor (and config.json's dtype) to this dtype.
    * ``force``: replace a non-empty ``out_dir``.
    * ``check_finite``: refuse factors with NaN/Inf (on by default here: a checkpoint is written once).
    * ``rounding``, ``seed``: for an FP8 checkpoint (block-scaled, ``quant_method: "fp8"``, or
      compressed-tensors FP8; ``portllm.fp8_formats``), how merged weights are requantized
      ("nearest" or "stochastic", seeded); the output keeps
      the input's format, and the report says how much of the patch survived requantization. With
      ``dtype``, an FP8 checkpoint is written dequantized instead (nothing is requantized).
    * ``fp4_scales``, ``fp4_clip``, ``allow_low_retention``: for an MXFP4 checkpoint (GPT-OSS's experts,
      ``portllm.port_mxfp4``): keep each block's scale ("reuse") or recompute it ("fresh"); a block the
      merge no longer fits in its scale is rescaled ("rescale") or refused ("refuse"); a port that keeps
      less than half of the patch is refused (nothing written) unless ``allow_low_retention``.
      The same for an NVFP4 checkpoint (compressed-tensors' ``nvfp4-pack-quantized``, ``portllm.port_nvfp4``),
      per group of 16 under the weight's global scale.
    * ``base``: the checkpoint directory the patch was trained on, for the report's measure of how far
      ``model_dir`` moved from it (patches portllm made carry that themselves; for a PEFT adapter the
      patch's ``base_model_name_or_path`` is used where it is a local checkpoint directory).
    Config, generation config, tokenizer and other non-weight files are copied. The compatibility
    report is checked (and logged) before anything is written.
    * ``dry_run``: every check a port makes before it writes (paths, format, compatibility, factors,
      backends), and nothing written; the result's counts are zero.
    """
    t0 = time.perf_counter()
    model_dir, out_dir = os.fspath(model_dir), os.fspath(out_dir)
    patch_path = None
    if not isinstance(patch, Patch):
        patch_path = os.fspath(patch)
        patch = Patch.load(patch_path)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    patch = patch.scaled(scale) if scale != 1.0 else patch
    out_dtype = _dtype(dtype)
    device = _resolve_device(device)
    inputs = {"--model": model_dir, "--patch": patch_path, "--base": os.fspath(base) if base is not None else None}
    _check_out_dir(out_dir, inputs, force)
    copies, skipped = _plan_copy(model_dir)  # refuses FIFOs, devices and sockets before any work
    if log:
        for link in skipped:
            log(f"portllm port: not copied: {link} is a symbolic link (links are not followed)")
    watch = InputWatch()
    try:
        fmt = fp8_formats.checkpoint_format(model_dir)
    except fp8.FP8FormatError as e:
        raise IncompatiblePatchError(str(e)) from None
    packed = isinstance(fmt, (MXFP4Checkpoint, NVFP4Checkpoint))
    if packed and out_dtype is not None:
        raise IncompatiblePatchError(f"{model_dir}: an {fmt.key.upper()} checkpoint is written {fmt.key.upper()}; "
                                     "portllm does not write it dequantized (leave out --dtype)")
    for what, value, allowed in (("fp4_scales", fp4_scales, mxfp4.POLICIES), ("fp4_clip", fp4_clip, mxfp4.ON_CLIP)):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    dequant = fmt is not None and out_dtype is not None  # FP8 in, a dequantized 16/32-bit checkpoint out
    if rounding not in fp8.ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(fp8.ROUNDINGS)}, got {rounding!r}")
    with Checkpoint(model_dir) as ckpt:
        experts = len(patch.expert_factors)
        before = len(patch)
        try:
            patch = patch.for_checkpoint(model_dir, ckpt.keys())  # expert LoRA onto the checkpoint's tensors
        except ExpertPatchError as e:
            raise IncompatiblePatchError(str(e)) from None
        if log and experts:
            log(f"portllm port: LoRA on {experts} expert parameters, mapped onto {len(patch) - before} of the "
                "checkpoint's tensors as transformers saves them")
        mx_targets = {}
        if packed:  # the MXFP4 experts / NVFP4 weights apart: merged packed (port_mxfp4, port_nvfp4), the rest as usual
            full = patch
            patch, mx_targets = fmt.split(ckpt, patch)
        patch = resolve_fan_in_fan_out(ckpt, patch)
        report = check_compatibility(ckpt, patch, base=base)
        if log:
            for line in report.lines():
                log(f"portllm port: {line}")
        report.raise_for_errors()
        fp8_targets, fp8_pairs = {}, {}
        if dequant:  # every FP8 weight is dequantized with its scales, checked before any write
            for key in ckpt.keys():
                info = ckpt.info(key)
                if info.dtype not in (fp8.E4M3, torch.float8_e5m2):
                    continue
                if info.dtype != fp8.E4M3 or key + fmt.suffix not in ckpt.key_file:
                    raise IncompatiblePatchError(f"tensor {key}: {str(info.dtype).removeprefix('torch.')} without "
                                                 f"its scales (weight{fmt.suffix}); portllm dequantizes e4m3 weights "
                                                 f"with their scales only ({fmt.describe()})")
                try:
                    fmt.check(key, info.shape, info.dtype, ckpt.tensor(key + fmt.suffix))
                except fp8.FP8FormatError as e:
                    raise IncompatiblePatchError(str(e)) from None
                fp8_pairs[key] = key + fmt.suffix
        for name in patch:  # a weight the kernels cannot merge into: refused before any write
            key = tensor_target(weight_key(name))[0]
            info = ckpt.info(key)
            if not dequant and fmt is not None and info.dtype == fp8.E4M3 and key + fmt.suffix in ckpt.key_file:
                if patch[name].fan_in_fan_out or tensor_target(weight_key(name))[1] is not None:
                    raise IncompatiblePatchError(f"module {name}: portllm merges into FP8 weights stored [out, in], "
                                                 "one per module (not fan_in_fan_out, not fused experts)")
                try:  # the scales, checked before any write
                    fmt.check(key, info.shape, info.dtype, ckpt.tensor(key + fmt.suffix))
                except fp8.FP8FormatError as e:
                    raise IncompatiblePatchError(str(e)) from None
                fp8_targets[key] = key + fmt.suffix
                continue
            dt = out_dtype if (out_dtype is not None and info.dtype.is_floating_point) else info.dtype
            check_weight_dtype(torch.empty(0, dtype=dt), f"module {name} (tensor {weight_key(name)})")
        # Validate every factor before writing anything (a NaN found half-way would waste the work).
        if finite.enabled(check_finite):
            for name, m in (full if packed else patch).items():
                if not math.isfinite(m.scale):
                    raise NonFiniteMergeError(f"patch module {name}: scale {m.scale} is not finite")
                for which, t in (("B", m.B), ("A", m.A)):
                    if finite.count(t):
                        raise NonFiniteMergeError(f"patch module {name}: lora_{which} has NaN or Inf values")
        # The FP8 merge's backend, resolved on the port's device before any write; the MXFP4 merge's on
        # the CPU, where it runs whatever the port's device (its kernels are the reference and C++).
        fp8_backend = fmt.backend(backend, device) if fp8_targets else None
        mx_backend = None
        if mx_targets and isinstance(fmt, MXFP4Checkpoint):
            mx_backend = ops.resolve_backend(backend, "cpu", "mxfp4_merge")
        elif mx_targets and backend not in (None, "reference"):
            raise ValueError(f"backend {backend!r}: the NVFP4 merge runs on the reference backend only (PyTorch ops, "
                             "bit for bit compressed-tensors' quantizer); leave --backend out")

        if dry_run:
            return PortResult(out_dir, report, 0, 0, 0, time.perf_counter() - t0, str(device), None, skipped)

        def last_checks():
            _check_out_dir(out_dir, inputs, force)
            ckpt.check_unchanged()  # a shard rewritten during the port: no output
            watch.check()

        with staging_dir(out_dir, log=log, before_replace=last_checks) as tmp:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            requant = (_FP8Merges(ckpt, patch, fmt, fp8_targets, rounding, seed, fp8_backend, device)
                       if fp8_targets else None)
            if mx_targets:
                requant = fmt.merges(ckpt, mx_targets, policy=fp4_scales, on_clip=fp4_clip, rounding=rounding,
                                      seed=seed, backend=mx_backend)
            dq = _Dequantize(ckpt, fp8_pairs, fmt) if dequant else None
            stats = write_weights(ckpt, patch, tmp, device, out_dtype, backend, progress, check_finite, requant,
                                  dq)
            if requant is not None and log:
                for line in requant.lines():
                    log(f"portllm port: {line}")
            if mx_targets:
                requant.check_retention(allow_low_retention)
                stats["merged"] += len(mx_targets)  # (an MXFP4 parameter, all its experts, is one merged tensor)
            _copy_other_files(ckpt, tmp, out_dtype, stats["total_size"], copies, watch,
                              dropped=dq.dropped if dq is not None else None)
            write_json(os.path.join(tmp, "portllm_port.json"), {
                "source": os.path.abspath(model_dir), "patch_base_model": patch.base_model,
                "patch_modules": len(full if packed else patch), "scale": scale,
                "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
                "report": report.lines() + (requant.lines() if requant is not None else []),
                **({fmt.key if mx_targets else "fp8": requant.summary()} if requant is not None else {})}, indent=2)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PortResult(out_dir, report, stats["tensors"], stats["merged"], stats["total_size"],
                      time.perf_counter() - t0, str(device), peak, skipped)


class _Dequantize:
    """FP8 weights written dequantized (``port(..., dtype=...)`` on an FP8 checkpoint): each weight is
    dequantized with its scales (read out of order) as its format's loader does; the scale tensors
    are dropped (with, for compressed-tensors, the quantized modules' activation scales)."""

    def __init__(self, ckpt: Checkpoint, pairs: dict[str, str], fmt):
        self.ckpt, self.pairs, self.fmt = ckpt, pairs, fmt
        self.dropped = set(pairs.values()) | fmt.also_dropped(ckpt.keys(), pairs.keys())

    def owns(self, key: str) -> bool:
        return key in self.pairs

    def weight(self, key: str, q: torch.Tensor) -> torch.Tensor:
        return self.fmt.dequantize(q, self.ckpt.tensor(self.pairs[key]))


class _FP8Merges:
    """The FP8 weights a port merges into (``portllm.fp8_formats``): each weight and its new scales are
    computed when the first of the two comes up in file order (the other read out of order), and
    handed out when each one's turn to be written comes; the retention is summed per module."""

    def __init__(self, ckpt: Checkpoint, patch: Patch, fmt, targets: dict[str, str], rounding: str, seed: int,
                 backend, device="cpu"):
        self.ckpt, self.fmt, self.rounding, self.seed, self.backend = ckpt, fmt, rounding, seed, backend
        self.device = device
        self.weights = targets  # weight key -> scale key
        self.scales = {v: k for k, v in targets.items()}
        self.modules = {weight_key(name): name for name in patch}
        self.patch = patch
        self.pending: dict[str, torch.Tensor] = {}
        self.stats: dict[str, fp8.Retention] = {}

    def owns(self, key: str) -> bool:
        return key in self.weights or key in self.scales

    def result(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        wkey = key if key in self.weights else self.scales[key]
        q = t if key == wkey else self.ckpt.tensor(wkey)
        s = t if key != wkey else self.ckpt.tensor(self.weights[wkey])
        name = self.modules[wkey]
        m = self.patch[name]
        scale = torch.full((m.rank,), m.scale, dtype=torch.float32)
        # Each weight's stream from the seed and its own name: not from file order, and two seeds never
        # share streams between tensors.
        seed = zlib.crc32(f"{self.seed}|{wkey}".encode())
        q2, s2, st = self.fmt.merge(q, s, m.B, m.A, scale, rounding=self.rounding, seed=seed, backend=self.backend,
                                    name=wkey, device=self.device)
        self.stats[name] = st
        other = self.weights[wkey] if key == wkey else wkey
        self.pending[other] = s2 if key == wkey else q2
        return q2 if key == wkey else s2

    def total(self) -> fp8.Retention:
        tot = fp8.Retention()
        for st in self.stats.values():
            tot.add(st)
        return tot

    def summary(self) -> dict:
        tot = self.total()
        return {"rounding": self.rounding, "seed": self.seed, "retained": tot.retained, "noise": tot.noise,
                "modules": {k: {"retained": v.retained, "noise": v.noise} for k, v in self.stats.items()}}

    def lines(self) -> list[str]:
        tot = self.total()
        worst = min(self.stats.items(), key=lambda kv: kv[1].retained) if self.stats else None
        out = [f"FP8 ({self.rounding} rounding, {self.fmt.describe()}): {tot.retained:.1%} of the "
               f"patch survived requantization over {len(self.stats)} weights (noise {tot.noise:.2f} of the "
               f"patch's norm); least: {worst[0]} {worst[1].retained:.1%}" if worst else "FP8: nothing merged"]
        if tot.retained < 0.5:
            out.append("warning: less than half of the patch survived requantization"
                       + ("; try --rounding stochastic" if self.rounding == "nearest" else ""))
        return out


def _plan_copy(model_dir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """What ``_copy_other_files`` will copy: (entry, "file" | "dir" | "link-file") for the model
    directory's non-weight entries, and the links it will not follow. A top-level link is copied as
    the file it names only if that is a regular file inside the model directory; links below the top
    are never followed. Any FIFO, device or socket is refused here, by name, before any work. In a
    Hugging Face hub cache snapshot, whose files are links to the repository's blobs, links into
    that repository count as inside. A config.json that is a link out is refused: without it the
    output would be no model."""
    scope = link_scope(model_dir)
    copies, skipped = [], []
    for entry in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, entry)
        if entry.endswith(".safetensors") or entry.startswith(".") or entry == "portllm_port.json":
            continue
        st = os.lstat(src)
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.stat(src)
            except OSError:
                target = None
            if target is not None and stat.S_ISREG(target.st_mode) and within(src, scope):
                copies.append((entry, "link-file"))
            elif entry == "config.json":
                raise UnsafePathError(f"{src} is a symbolic link to {os.path.realpath(src)}, outside the model "
                                      "directory: refusing to follow it (copy the file into the model directory)")
            else:
                skipped.append(entry)
        elif stat.S_ISDIR(st.st_mode):
            _refuse_special(src, model_dir, skipped, entry)
            copies.append((entry, "dir"))
        elif stat.S_ISREG(st.st_mode):
            copies.append((entry, "file"))
        else:
            raise NotARegularFileError(f"model file {src} is {kind(st.st_mode)}, not a regular file: "
                                       "refusing to copy it")
    return copies, skipped


def _refuse_special(directory: str, model_dir: str, skipped: list[str], rel: str):
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                skipped.append(os.path.relpath(full, model_dir))
            elif not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
                raise NotARegularFileError(f"model file {full} is {kind(st.st_mode)}, not a regular file: "
                                           "refusing to copy it")


def _copy_other_files(ckpt: Checkpoint, tmp: str, out_dtype, total_size: int,
                      copies: list[tuple[str, str]] | None = None, watch: InputWatch | None = None,
                      dropped: set[str] | None = None):
    """Everything but the weights: config (dtype updated if converted; ``dropped``, the scale tensors
    of a dequantized FP8 checkpoint: its quantization_config removed, and they leave the index),
    tokenizer, index, ...
    (``copies``: from ``_plan_copy``). Only regular files are read; symbolic links are not followed
    out of the model directory, nor at all below its top level. Every file copied is added to
    ``watch``, so that one modified during the port is noticed before the output is put in place."""
    model_dir = ckpt.path
    if copies is None:
        copies, _ = _plan_copy(model_dir)
    watch = watch if watch is not None else InputWatch()
    for entry, how in copies:
        src = os.path.join(model_dir, entry)
        dst = os.path.join(tmp, entry)
        if entry == INDEX:
            index = dict(ckpt.index)
            index["metadata"] = dict(index.get("metadata") or {}, total_size=total_size)
            if dropped:
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
            write_json(dst, index, indent=2)
        elif entry == "config.json" and out_dtype is not None:
            with open_regular(src, "model file", binary=False) as f:
                watch.add_fd(src, f)
                cfg = json.load(f)
            name = str(out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = name
            if dropped is not None:
                cfg.pop("quantization_config", None)
            write_json(dst, cfg, indent=2)
        elif how == "dir":
            copy_tree(src, dst, what="model file", watch=watch)
        else:
            copy_file(src, dst, what="model file", watch=watch)
