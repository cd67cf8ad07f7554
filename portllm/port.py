"""``port``: stream a checkpoint directory through patch_add_, tensor by tensor, into a new one.

Memory stays near one tensor whatever the model's size: each tensor is read with plain reads,
merged on the chosen device if the patch touches it, written, and dropped. The result is written
into a temporary directory beside ``out_dir`` and renamed at the end, so an interrupted port never
leaves a half-written model that looks complete; ``model_dir`` is only ever read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from portllm.atomic import check_disjoint, safe_join, staging_dir, write_json
from portllm.checkpoint import INDEX, Checkpoint, weight_key
from portllm.compat import CompatReport, check_compatibility, resolve_fan_in_fan_out
from portllm.merge import merge_into
from portllm.patch import Patch
from portllm.safetensors_io import SafetensorsWriter

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


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
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
         progress: bool = True, log=print) -> PortResult:
    """Writes ``model_dir`` with ``W += scale · ΔW`` merged into every patch module, to ``out_dir``.

    * ``patch``: a Patch or a path to one (PEFT adapter directory).
    * ``device``: where merges run ("cpu", "cuda", ...; default: cuda if available, else cpu).
    * ``dtype``: convert every floating-point tensor (and config.json's dtype) to this dtype.
    * ``force``: replace a non-empty ``out_dir``.
    * ``check_finite``: refuse factors with NaN/Inf (on by default here: a checkpoint is written once).
    Config, generation config, tokenizer and other non-weight files are copied. The compatibility
    report is checked (and logged) before anything is written.
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
    inputs = {"--model": model_dir, "--patch": patch_path}
    _check_out_dir(out_dir, inputs, force)
    with Checkpoint(model_dir) as ckpt:
        patch = resolve_fan_in_fan_out(ckpt, patch)
        report = check_compatibility(ckpt, patch)
        if log:
            for line in report.lines():
                log(f"portllm port: {line}")
        report.raise_for_errors()
        # Validate every factor before writing anything (a NaN found half-way would waste the work).
        if check_finite:
            for name, m in patch.items():
                if not math.isfinite(m.scale):
                    raise ValueError(f"patch module {name}: scale {m.scale} is not finite")
                for which, t in (("B", m.B), ("A", m.A)):
                    if not torch.isfinite(t).all():
                        raise ValueError(f"patch module {name}: lora_{which} has NaN or Inf values")
        with staging_dir(out_dir, log=log, before_replace=lambda: _check_out_dir(out_dir, inputs, force)) as tmp:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            stats = _write_weights(ckpt, patch, tmp, device, out_dtype, backend, progress, check_finite)
            _copy_other_files(ckpt, tmp, out_dtype, stats["total_size"])
            write_json(os.path.join(tmp, "portllm_port.json"), {
                "source": os.path.abspath(model_dir), "patch_base_model": patch.base_model,
                "patch_modules": len(patch), "scale": scale,
                "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
                "report": report.lines()}, indent=2)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PortResult(out_dir, report, stats["tensors"], stats["merged"], stats["total_size"],
                      time.perf_counter() - t0, str(device), peak)


def _write_weights(ckpt: Checkpoint, patch: Patch, tmp: str, device, out_dtype, backend, progress,
                   check_finite: bool = True) -> dict:
    """Reads, merges and writes every tensor, in file order. Reading the next tensor and writing the
    previous one run in two threads while this one merges (file I/O and torch ops release the GIL):
    at most three tensors are held at once."""
    targets = {weight_key(name): name for name in patch}
    jobs = [(fname, k) for fname in ckpt.files for k in ckpt.reader(fname).tensors]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(ckpt.info(k).nbytes for _, k in jobs), unit="B", unit_scale=True,
                   desc="portllm port", leave=False)
    stats = {"tensors": 0, "merged": 0, "total_size": 0}
    writers: dict[str, SafetensorsWriter] = {}

    def writer(fname: str) -> SafetensorsWriter:
        if fname not in writers:
            rd = ckpt.reader(fname)
            layout = [(k, out_dtype if (out_dtype is not None and i.dtype.is_floating_point) else i.dtype, i.shape)
                      for k, i in rd.tensors.items()]
            writers[fname] = SafetensorsWriter(safe_join(tmp, fname, what="shard name"), layout,
                                               rd.metadata or {"format": "pt"})
        return writers[fname]

    def write(fname: str, k: str, t: torch.Tensor):
        w = writer(fname)
        w.write(k, t)
        if w.complete:
            w.close()
        if bar is not None:
            bar.update(ckpt.info(k).nbytes)

    try:
        with ThreadPoolExecutor(1) as reads, ThreadPoolExecutor(1) as writes:
            nxt = reads.submit(ckpt.tensor, jobs[0][1]) if jobs else None
            pending = None
            for i, (fname, k) in enumerate(jobs):
                t = nxt.result()
                nxt = reads.submit(ckpt.tensor, jobs[i + 1][1]) if i + 1 < len(jobs) else None
                if out_dtype is not None and t.dtype.is_floating_point and t.dtype != out_dtype:
                    t = t.to(out_dtype)
                if k in targets:
                    # t is this port's own buffer (scratch): merged in place, checked after.
                    W = t.to(device)
                    merge_into(W, [(patch[targets[k]], 1.0)], backend=backend, check_finite=check_finite,
                               name=targets[k], scratch=True)
                    t = W.cpu()
                    stats["merged"] += 1
                stats["tensors"] += 1
                stats["total_size"] += t.numel() * t.element_size()
                if pending is not None:
                    pending.result()  # one write in flight at a time, in order
                pending = writes.submit(write, fname, k, t)
                del t
            if pending is not None:
                pending.result()
    finally:
        if bar is not None:
            bar.close()
        for w in writers.values():
            w.abort()
    return stats


def _copy_other_files(ckpt: Checkpoint, tmp: str, out_dtype, total_size: int):
    """Everything but the weights: config (dtype updated if converted), tokenizer, index, ...
    Symlinks are not followed out of the model directory: a link is copied as the file it names only
    if that file lies inside the model directory."""
    model_dir = ckpt.path
    real_model = os.path.realpath(model_dir)
    for entry in os.listdir(model_dir):
        src = os.path.join(model_dir, entry)
        if entry.endswith(".safetensors") or entry.startswith(".") or entry == "portllm_port.json":
            continue
        real = os.path.realpath(src)
        if not (real == real_model or real.startswith(real_model + os.sep)):
            continue  # a link to outside the model: not part of it
        dst = os.path.join(tmp, entry)
        if entry == INDEX:
            index = dict(ckpt.index)
            index["metadata"] = dict(index.get("metadata") or {}, total_size=total_size)
            write_json(dst, index, indent=2)
        elif entry == "config.json" and out_dtype is not None:
            with open(src) as f:
                cfg = json.load(f)
            name = str(out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = name
            write_json(dst, cfg, indent=2)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=False)
        else:
            shutil.copy2(src, dst)
