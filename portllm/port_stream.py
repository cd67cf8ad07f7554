"""The port's weight stream: every tensor of a checkpoint read, merged where the patch touches it, and
written, through a bounded pipeline that keeps the disk busy (``write_weights``).

* A tensor the port leaves as it is (not patched, no dtype conversion) is read straight into the
  output's write buffer (``SafetensorsWriter.copy_part``): no tensor, no extra copy.
* A patched (or converted) tensor goes through in chunks of rows of about ``CHUNK_BYTES``: rows of W
  need only the same rows of B (whole experts of a fused expert tensor), and every element gets the
  bits a whole-tensor merge gives it (``_plan`` says how).
  Three stages run at once: a reader thread fills the next chunk, this thread merges the current one
  in place, a writer thread writes the previous one. The buffers come from two pools of three (read,
  and converted where ``dtype`` changes), each buffer the largest chunk: 16 MiB, or one row (one
  expert of a fused expert tensor) where that is larger. So the memory held does not grow with the
  checkpoint, and no buffer's pages are faulted in twice.
* A finished shard's fsync runs in a thread of its own while the next shard is written (one at a
  time: a shard waits for the previous one's); all are done before ``write_weights`` returns.
* FP8 weights that the port requantizes or dequantizes go through whole (their scales are per block
  and per tensor), as do weights stored [in, out] and 0-d tensors. MXFP4 experts stream in chunks of
  whole experts where their blocks come before their scales in the file (``port_mxfp4``).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from portllm import reference
from portllm.atomic import safe_join
from portllm.checkpoint import Checkpoint, tensor_target, weight_key
from portllm.merge import merge_experts_into, merge_into
from portllm.patch import Patch, PatchModule
from portllm.safetensors_io import SafetensorsWriter

CHUNK_BYTES = 16 << 20  # per chunk; three in flight (see the module's docstring)


@dataclass
class _Unit:
    """One step of the stream: a tensor copied whole by the kernel ("copy"), rows lo:hi of a tensor
    ("rows"), or a whole tensor through this process ("whole")."""

    fname: str
    key: str
    kind: str
    lo: int = 0
    hi: int = 0
    last: bool = True  # the tensor's last unit


class _Pool:
    """At most ``count`` uint8 buffers of ``nbytes``, made on first need and reused; ``get`` waits for
    one to come back when all are out."""

    def __init__(self, nbytes: int, count: int):
        self.nbytes, self.count, self.made = nbytes, count, 0
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()

    def get(self) -> torch.Tensor:
        with self.lock:
            if self.free.empty() and self.made < self.count:
                self.made += 1
                return torch.empty(self.nbytes, dtype=torch.uint8)
        return self.free.get()

    def put(self, buf: torch.Tensor):
        self.free.put(buf)


def _rows_of(m: PatchModule, lo: int, hi: int) -> PatchModule:
    """The module restricted to rows lo:hi of the weight (stored [out, in]: see ``_plan``)."""
    return PatchModule(m.B[lo:hi], m.A, m.scale, False)


def cast_into(t: torch.Tensor, out: torch.Tensor, key: str) -> torch.Tensor:
    """``out.copy_(t)`` (a dtype conversion), refused (naming the tensor) where a finite value becomes Inf."""
    out.copy_(t)
    if torch.finfo(out.dtype).max < torch.finfo(t.dtype).max:
        # Non-finite after, finite before: an overflow. (Compared as counts: one pass each.)
        if int(torch.isinf(out).sum()) != int(torch.isinf(t).sum()):
            big = float(t.float().abs().nan_to_num(0, 0, 0).max())
            raise ValueError(f"tensor {key}: converting {str(t.dtype).removeprefix('torch.')} to "
                             f"{str(out.dtype).removeprefix('torch.')} overflows (|value| up to {big:.6g}, above "
                             f"{torch.finfo(out.dtype).max:.6g}); choose a wider --dtype or none")
    return out


def cast(t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor:
    """``t.to(dtype)``, refused as ``cast_into`` refuses."""
    return cast_into(t, torch.empty(t.shape, dtype=dtype, device=t.device), key)


def _plan(ckpt: Checkpoint, jobs, targets, out_dtype, whole, patch_fif, chunk_bytes: int,
          streamed=frozenset()) -> tuple[list[_Unit], int, int]:
    """The units of ``jobs`` [(file, key)], and the largest chunk read and converted, in bytes.

    A chunk of a patched 2-D weight is a multiple of the reference backend's own row blocks
    (``reference._CHUNK_ELEMS``), so that its addmm sees the blocks it sees on the whole tensor
    and gives the same bits (the C++ kernel's bits do not depend on the rows at all). A weight
    stored [in, out] (``fan_in_fan_out``) goes whole: its stored rows are the update's columns,
    and no backend promises the same bits for a column slice."""
    units, most_in, most_out = [], 0, 0
    for fname, k in jobs:
        info = ckpt.info(k)
        converts = out_dtype is not None and info.dtype.is_floating_point and info.dtype != out_dtype
        fif = k in targets and any(i is None and patch_fif(n) for i, n in targets[k])
        if whole(k) or fif or not info.shape or info.nbytes == 0:
            units.append(_Unit(fname, k, "whole"))
        elif k not in targets and k not in streamed and not converts:
            units.append(_Unit(fname, k, "copy"))
        else:
            n = info.shape[0]
            row_in = info.nbytes // n
            row_out = row_in // info.dtype.itemsize * out_dtype.itemsize if converts else 0
            step = max(1, chunk_bytes // max(row_in, row_out))
            if k in targets and len(info.shape) == 2:
                block = max(1, reference._CHUNK_ELEMS // max(info.shape[1], 1))
                step = max(block, step // block * block)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                units.append(_Unit(fname, k, "rows", lo, hi, hi == n))
            most_in, most_out = max(most_in, min(step, n) * row_in), max(most_out, min(step, n) * row_out)
    return units, most_in, most_out


def write_weights(ckpt: Checkpoint, patch: Patch, tmp: str, device, out_dtype, backend, progress,
                  check_finite: bool = True, requant=None, dequant=None, chunk_bytes: int | None = None) -> dict:
    """Reads, merges and writes every tensor of ``ckpt`` into ``tmp``, in file order (see the module's
    docstring); the patch's factors must have been checked already (``port`` checks them once).
    ``requant``: FP8 weights merged and requantized whole (``port._FP8Merges``), or MXFP4 experts in
    chunks of experts where their blocks come before their scales (``port_mxfp4.MXFP4Merges``: ``streamed``
    and ``rows``), whole otherwise; ``dequant``: FP8 weights
    dequantized (fp32), merged, then converted once to ``out_dtype``, their scale tensors not written
    (``port._Dequantize``). ``chunk_bytes``: the chunk size (default ``CHUNK_BYTES``). Returns the
    counts of tensors, merged tensors and bytes written."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    dropped = dequant.dropped if dequant is not None else set()
    targets: dict[str, list[tuple[int | None, str]]] = {}  # tensor -> (expert index or None, module)
    for name in patch:
        key, index = tensor_target(weight_key(name))
        targets.setdefault(key, []).append((index, name))
    jobs = [(fname, k) for fname in ckpt.files for k in ckpt.reader(fname).tensors if k not in dropped]
    # MXFP4 experts whose blocks come before their scales stream in chunks of experts (the scales,
    # a sixteenth of the bytes, are held until their turn); everything else requantized goes whole
    streamed = requant.streamed([k for _, k in jobs]) if requant is not None and hasattr(requant, "streamed") else set()
    units, most_in, most_out = _plan(
        ckpt, jobs, targets, out_dtype,
        lambda k: k not in streamed and ((requant is not None and requant.owns(k))
                                         or (dequant is not None and dequant.owns(k))),
        lambda name: patch[name].fan_in_fan_out, chunk_bytes, streamed)
    inputs, outputs = _Pool(most_in, 3), _Pool(most_out, 3)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(ckpt.info(k).nbytes for _, k in jobs), unit="B", unit_scale=True,
                   desc="portllm port", leave=False)
    stats = {"tensors": 0, "merged": 0, "total_size": 0}
    writers: dict[str, SafetensorsWriter] = {}
    merge_kw = dict(backend=backend, check_finite=check_finite, scratch=True, factors_checked=True)

    def writer(fname: str) -> SafetensorsWriter:
        if fname not in writers:
            rd = ckpt.reader(fname)
            layout = [(k, out_dtype if (out_dtype is not None and i.dtype.is_floating_point) else i.dtype, i.shape)
                      for k, i in rd.tensors.items() if k not in dropped]
            writers[fname] = SafetensorsWriter(safe_join(tmp, fname, what="shard name"), layout,
                                               rd.metadata or {"format": "pt"})
        return writers[fname]

    def read(u: _Unit):
        if u.kind == "copy":
            return None
        if u.kind == "whole":
            return ckpt.tensor(u.key)
        info = ckpt.info(u.key)
        row = info.nbytes // info.shape[0]
        buf = inputs.get()
        raw = buf[:(u.hi - u.lo) * row]
        ckpt.reader(u.fname).read_into(u.key, u.lo * row, raw)
        return buf, raw.view(info.dtype).view(u.hi - u.lo, *info.shape[1:])

    def merge_rows(W: torch.Tensor, u: _Unit):
        chunked = W.shape[0] != ckpt.info(u.key).shape[0]
        experts = {i - u.lo: [(patch[n], 1.0)] for i, n in targets[u.key] if i is not None and u.lo <= i < u.hi}
        if experts:  # a fused [experts, ., .] tensor: one batched merge
            merge_experts_into(W, experts, name=u.key, first=u.lo, **merge_kw)
        for i, n in targets[u.key]:
            if i is None:
                m = _rows_of(patch[n], u.lo, u.hi) if chunked else patch[n]
                merge_into(W, [(m, 1.0)], name=f"{n} (rows {u.lo}:{u.hi})" if chunked else n, **merge_kw)

    def process(u: _Unit, got):
        """The unit's payload for ``write``, merged and converted."""
        if u.kind == "copy":
            return None
        if u.kind == "rows":
            buf, t = got
            held = (inputs, buf)
            if out_dtype is not None and t.dtype.is_floating_point and t.dtype != out_dtype:
                out = outputs.get()
                t = cast_into(t, out[:t.numel() * out_dtype.itemsize].view(out_dtype).view(t.shape), u.key)
                inputs.put(buf)
                held = (outputs, out)
            if u.key in streamed:
                t.copy_(requant.rows(u.key, u.lo, u.hi, t))  # MXFP4 experts lo:hi, merged and requantized
            elif u.key in targets:
                W = t.to(device)  # (on the CPU: t itself, this port's own buffer, merged in place)
                merge_rows(W, u)
                if W is not t:
                    t.copy_(W)
            return t.reshape(-1).view(torch.uint8), held
        t, k = got, u.key
        late_cast = dequant is not None and dequant.owns(k)
        if late_cast:
            t = dequant.weight(k, t)  # fp32: merged below, then converted once
        elif out_dtype is not None and t.dtype.is_floating_point and t.dtype != out_dtype:
            t = cast(t, out_dtype, k)
        if requant is not None and requant.owns(k):
            t = requant.result(k, t)  # an FP8 weight merged and requantized, or its new block scales
        elif k in targets:
            W = t.to(device)  # t is this port's own buffer (scratch): merged in place, checked after
            merge_rows(W, _Unit(u.fname, k, "whole", 0, t.shape[0] if t.dim() else 0))
            t = W.cpu()
        if late_cast:
            t = cast(t, out_dtype, k)
        return t

    def write(u: _Unit, payload, syncs: ThreadPoolExecutor, closing: list):
        w = writer(u.fname)
        info = ckpt.info(u.key)
        if u.kind == "copy":
            w.copy_part(u.key, ckpt.reader(u.fname).fileno(), info.begin, info.nbytes)
        elif u.kind == "rows":
            data, (pool, buf) = payload
            w.write_part(u.key, data)
            pool.put(buf)
        else:
            w.write(u.key, payload)
        if w.complete:
            if closing:
                closing[-1].result()  # at most one shard's fsync waiting: shards do not pile up
            closing.append(syncs.submit(w.close))  # fsync while the next shard is written
        if bar is not None:
            bar.update(info.nbytes if u.kind != "rows" else info.nbytes // info.shape[0] * (u.hi - u.lo))

    closing: list = []
    try:
        with ThreadPoolExecutor(1) as reads, ThreadPoolExecutor(1) as writes, ThreadPoolExecutor(1) as syncs:
            nxt = reads.submit(read, units[0]) if units else None
            pending = None
            for i, u in enumerate(units):
                got = nxt.result()
                nxt = reads.submit(read, units[i + 1]) if i + 1 < len(units) else None
                payload = process(u, got)
                stats["total_size"] += (ckpt.info(u.key).nbytes if u.kind == "copy" else payload[0].numel()
                                        if u.kind == "rows" else payload.numel() * payload.element_size())
                if u.last:
                    stats["tensors"] += 1
                    stats["merged"] += int(u.key in targets)
                if pending is not None:
                    pending.result()  # one write in flight at a time, in order
                pending = writes.submit(write, u, payload, syncs, closing)
                del payload, got
            if pending is not None:
                pending.result()
            for c in closing:
                c.result()
    finally:
        if bar is not None:
            bar.close()
        for w in writers.values():
            w.abort()
    return stats
