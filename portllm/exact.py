"""Merges that undo bit for bit: ``apply_patch(..., exact=True)`` and the ``remove_patch`` that follows.

A merge rounds: W′ = round(W + Δ). Undoing it by merging −Δ gives round(W′ − Δ), which equals W
for nearly every element but not all (rounding W′ lost the low bits of W where |W′| reached a
larger binade). So the exact merge runs, per row chunk, the merge and then the undo's own
computation, and records the elements where the undo misses W. What is stored per weight:

* the exceptions' positions, as gaps between consecutive positions in a byte stream (a byte
  0..254 advances by byte + 1 and marks an exception, 255 advances by 255 and marks none);
* for each, the difference of W's bit pattern and the undo's as integers (an int8: ±1 nearly
  always, a one-ulp miss), and, for the rare one that does not fit (a change of sign, a signed
  zero), W's raw bits;
* the code path of the merge (backend, CPU vector path) and checksums of W′ and of W, so that an
  undo that could not restore W bit for bit is refused before any weight is written, and one that
  did not is reported.

About 16 bits per exception: at a relative delta of 2% (2.3% exceptions on random bf16 weights)
that is about 0.4 bits per weight, against 16 for a golden copy.

Both directions are ``patch_add_`` calls (W′ is what a plain merge gives), on the same row-chunk
views with the same backend; ``patch_add_`` is deterministic, so the undo recomputes, bit for bit,
what the merge predicted. The undo is one ``patch_add_`` pass plus the exceptions and two checksum
reads; the exact merge costs about three merges (it also runs the undo, and keeps copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from portllm import _ext, finite, ops
from portllm.checkpoint import tensor_target, weight_key
from portllm.merge import MergePlan, merge_factors

# Rows per chunk: the merge keeps two copies of a chunk (the old and the merged bits), 8 MiB each
# for a bf16 weight, whatever the weight's size.
_CHUNK_ELEMS = 1 << 22
_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


class ExactUndoError(RuntimeError):
    """An exact undo cannot restore the weights bit for bit (they changed since the merge, or the
    delta cannot be recomputed identically); the message names the module."""


@dataclass
class WeightUndo:
    """What restores one weight: the exceptions of round(W′ − Δ) against W, encoded (see module)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device_type: str
    path: str  # the backend (and CPU vector path) the merge ran on: the undo runs the same
    chunk_rows: int
    stream: torch.Tensor  # uint8: gap codes of every chunk, concatenated
    stream_offsets: list[int]  # per chunk: where its codes start (len chunks + 1)
    diff: torch.Tensor  # int8 [exceptions]: ord(W) - ord(round(W′ - Δ))
    diff_offsets: list[int]  # per chunk (len chunks + 1)
    far_index: torch.Tensor  # int64: flat positions whose W bits are stored raw
    far_bits: torch.Tensor  # W's raw bits there (int16/int32)
    sum_merged: int  # checksum of W′ (``_bit_sum`` per chunk, summed mod 2^64)
    sum_original: int  # checksum of W

    @property
    def exceptions(self) -> int:
        return int(self.diff.numel())

    def __repr__(self) -> str:
        return (f"WeightUndo({'x'.join(map(str, self.shape))} {str(self.dtype).removeprefix('torch.')}, "
                f"{self.exceptions} misses, {self.nbytes} bytes, path {self.path})")

    @property
    def nbytes(self) -> int:
        return (self.stream.numel() + self.diff.numel() + self.far_index.numel() * 8
                + self.far_bits.numel() * self.far_bits.element_size())


def _encode_positions(idx: torch.Tensor) -> torch.Tensor:
    """Sorted distinct positions >= 0 -> the uint8 gap stream (see module docstring)."""
    if idx.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=idx.device)
    gaps = torch.diff(idx, prepend=idx.new_full((1,), -1)) - 1  # >= 0
    q = gaps // 255
    counts = q + 1
    out = torch.full((int(counts.sum()),), 255, dtype=torch.uint8, device=idx.device)
    out[counts.cumsum(0) - 1] = (gaps - 255 * q).to(torch.uint8)
    return out


def _decode_positions(stream: torch.Tensor) -> torch.Tensor:
    marks = stream != 255
    pos = (stream.to(torch.int64) + marks).cumsum(0) - 1  # a code b < 255 advances b + 1, 255 advances 255
    return pos[marks]


def _chunks(m: int, n: int):
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    return rows, range(0, m, rows)


def _bit_sum(t: torch.Tensor) -> int:
    """A checksum of t's bits: the sum, mod 2^64, of its bytes read as 64-bit words (one fast
    vectorised pass; element-wise int16 sums are 40x slower), or of its elements where the byte
    count is not a multiple of 8. A function of the logical content, whatever t's strides."""
    b = t.contiguous().view(-1).view(torch.uint8)
    if b.numel() % 8 == 0:
        return int(b.view(torch.int64).sum()) % 2**64
    return int(t.contiguous().view(_INT[t.dtype] if t.is_floating_point() else t.dtype).sum(dtype=torch.int64)) % 2**64


def _chunk_sum(W: torch.Tensor, rows: int) -> int:
    total = 0
    for i in range(0, W.shape[0], rows):
        total = (total + _bit_sum(W[i:i + rows])) % 2**64
    return total


def _fingerprint(W: torch.Tensor, backend: str) -> str:
    """The code path a merge of W runs: the backend, and on a CPU the vector path (PORTLLM_CPU_ISA)."""
    return f"{backend}@{_ext.cpu_isa()}" if W.device.type == "cpu" and backend == "cpp" else backend


def merge_recorded(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, *,
                   backend: str | None = None) -> WeightUndo:
    """W += B·diag(s)·A in place with ``patch_add_`` (the same bits as a plain merge with that
    backend), returning what undoes it exactly: per row chunk, the merge, then the undo's own
    computation (``patch_add_`` with -s, on the same view) to find where it misses W."""
    int_dtype = _INT[W.dtype]
    m, n = W.shape
    backend = ops.resolve_backend(backend, W.device, "patch_add_")
    # The comparison's own backend, chosen before any write and never from PORTLLM_BACKEND (which names
    # the merge's: a "cuda" or "triton" there has no bit_misses and must not stop a merge half-way).
    misses = ops.default_backend(W.device, "bit_misses")
    rows, starts = _chunks(m, n)
    neg = -s
    streams, diffs, far_i, far_b = [], [], [], []
    s_off, d_off = [0], [0]
    sum_merged = sum_original = 0
    # Two chunk-sized buffers, reused: a fresh 8 MB clone per chunk paid its page faults every time
    # (on a CPU the copies ran at a quarter of the copy bandwidth).
    buf0 = torch.empty(min(rows, m) * n, dtype=W.dtype, device=W.device)
    buf1 = torch.empty_like(buf0)
    with torch.no_grad():
        for i in starts:
            w, b = W[i:i + rows], B[i:i + rows]
            w0 = buf0[:w.numel()].view(w.shape).copy_(w).view(int_dtype).view(-1)
            ops.patch_add_(w, b, A, s, backend=backend)
            merged = buf1[:w.numel()].view(w.shape).copy_(w)
            if w.is_contiguous():  # the copy is the same call's operand: undo it, w keeps the merge
                ops.patch_add_(merged, b, A, neg, backend=backend)
                back, merged = merged.view(int_dtype).view(-1), w
            else:  # what remove will compute, on the very view it will compute on
                ops.patch_add_(w, b, A, neg, backend=backend)
                back = w.contiguous().view(int_dtype).view(-1)
            # Where the undo misses, and the difference of the bit patterns as integers: ±1 for a
            # one-ulp miss of the same sign (the undo adds it back with one scatter_add_); sign
            # changes and signed zeros are far.
            loc, d = ops.bit_misses(w0, back, backend=misses)
            far = d.abs() > 127
            streams.append(_encode_positions(loc))
            diffs.append(torch.where(far, 0, d).to(torch.int8))
            far_i.append(loc[far] + i * n)
            far_b.append(w0[loc[far]])
            s_off.append(s_off[-1] + streams[-1].numel())
            d_off.append(d_off[-1] + loc.numel())
            if merged is not w:
                w.copy_(merged)
            sum_original = (sum_original + _bit_sum(w0)) % 2**64
            sum_merged = (sum_merged + _bit_sum(merged)) % 2**64
    return WeightUndo((m, n), W.dtype, W.device.type, _fingerprint(W, backend), rows, torch.cat(streams), s_off,
                      torch.cat(diffs), d_off, torch.cat(far_i), torch.cat(far_b), sum_merged, sum_original)


def check_undo(W: torch.Tensor, u: WeightUndo, name: str):
    """Raises ExactUndoError naming ``name`` unless W is the weight ``u`` was recorded on, unchanged,
    and the merge's code path can run again."""
    if tuple(W.shape) != u.shape or W.dtype != u.dtype:
        raise ExactUndoError(f"module {name}: the weight is {W.dtype} {tuple(W.shape)} but the merge was recorded "
                             f"on {u.dtype} {u.shape}")
    if W.device.type != u.device_type:
        raise ExactUndoError(f"module {name}: the merge was recorded on {u.device_type}, the weight is now on "
                             f"{W.device}; move the model back to undo exactly (or pass exact=False)")
    backend = u.path.split("@")[0]
    reason = ops.backend_unavailable_reason(backend, W.device, "patch_add_")
    if reason is None and _fingerprint(W, backend) != u.path:
        reason = f"the CPU now runs the {_ext.cpu_isa()} path (PORTLLM_CPU_ISA?)"
    if reason is not None:
        raise ExactUndoError(f"module {name}: the exact merge ran on {u.path}, which cannot run now ({reason}); "
                             "undo it where it was merged, or pass exact=False")
    if _chunk_sum(W, u.chunk_rows) != u.sum_merged:
        raise ExactUndoError(f"module {name}: the weight changed since the exact merge (another merge, a training "
                             "step?); undo the later changes first, or pass exact=False to subtract the patch "
                             "with rounding")


def undo_recorded(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, u: WeightUndo,
                  name: str) -> None:
    """Restores W bit for bit from the merged W and ``u`` (check with ``check_undo`` first): the
    merge's row chunks, each ``patch_add_`` with -s on the merge's code path, then the exceptions."""
    int_dtype = _INT[W.dtype]
    m, n = W.shape
    backend = u.path.split("@")[0]
    neg = -s
    total = 0
    with torch.no_grad():
        for c, i in enumerate(range(0, m, u.chunk_rows)):
            w = W[i:i + u.chunk_rows]
            ops.patch_add_(w, B[i:i + u.chunk_rows], A, neg, backend=backend)
            flat = w.view(int_dtype).view(-1) if w.is_contiguous() else None
            bits = flat if flat is not None else w.contiguous().view(int_dtype).view(-1)
            loc = _decode_positions(u.stream[u.stream_offsets[c]:u.stream_offsets[c + 1]])
            if loc.numel():
                bits.scatter_add_(0, loc, u.diff[u.diff_offsets[c]:u.diff_offsets[c + 1]].to(int_dtype))
            lo, hi = i * n, (i + w.shape[0]) * n
            sel = (u.far_index >= lo) & (u.far_index < hi)
            if bool(sel.any()):
                bits[u.far_index[sel] - lo] = u.far_bits[sel]
            if flat is None:
                w.copy_(bits.view(w.dtype).view(w.shape))
            total = (total + _bit_sum(w)) % 2**64
    if total != u.sum_original:
        raise ExactUndoError(f"module {name}: the weight was restored to within rounding but not bit for bit (the "
                             "merge's delta was not recomputed identically)")


# ---------------------------------------------------------------------------------------------
# Exact merges of a model's weights: ``apply_patch(..., exact=True)`` and the ``remove_patch`` after it


@dataclass
class ExactMerge:
    """One ``apply_patch(..., exact=True)``: the patches, scales, and each weight's undo."""

    patches: list
    scales: list[float]
    weights: dict[str, tuple[WeightUndo, bool]]  # module -> (undo, fan_in_fan_out)
    entries: dict[str, list] = field(repr=False, default_factory=dict)
    digest: str = ""

    def __repr__(self) -> str:
        return (f"ExactMerge({len(self.patches)} patch(es), scales {self.scales}, {len(self.weights)} weights, "
                f"{self.nbytes / 2**20:.2f} MiB of undo, {self.bits_per_weight:.2f} bits per weight)")

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u, _ in self.weights.values())

    @property
    def bits_per_weight(self) -> float:
        n = sum(u.shape[0] * u.shape[1] for u, _ in self.weights.values())
        return 8 * self.nbytes / max(n, 1)


def merge_exact(plans: dict[str, MergePlan], entries: dict[str, list], patches: list, scales: list[float],
                digest: str) -> ExactMerge:
    """Runs the planned merges (``portllm.merge.plan_merge``, one per module, of that module's
    ``entries``) recording each weight's undo; all or nothing: a refused or interrupted merge undoes,
    exactly, the modules merged before it."""
    done: dict[str, tuple[WeightUndo, bool]] = {}

    def roll_back():
        for undone, (u, _) in reversed(list(done.items())):
            p = plans[undone]
            undo_recorded(p.target, p.B, p.A, p.s, u, undone)

    for name, p in plans.items():
        before = finite.count(p.target) if p.check_finite else 0
        try:
            done[name] = (merge_recorded(p.target, p.B, p.A, p.s, backend=p.backend), p.fan_in_fan_out)
        except BaseException:
            roll_back()  # (an interrupt between modules; one inside a module's merge leaves that module merged)
            raise
        if p.check_finite:
            try:
                p.refuse_if_added(before)
            except ValueError:
                roll_back()
                raise
    return ExactMerge(list(patches), list(scales), done, {k: list(v) for k, v in entries.items()}, digest)


def remove_exact(params: dict[str, torch.nn.Parameter], rec: ExactMerge, records: list):
    """Restores, bit for bit, every weight an exact merge changed (``params``: the model's named
    parameters); checks every weight before writing any. A restoration that ran but missed a bit
    spends the record (it is taken off ``records``, the model's list of merges)."""
    work = []
    for name, (u, transposed) in rec.weights.items():
        key, index = tensor_target(weight_key(name))
        if key not in params:
            raise ExactUndoError(f"module {name}: no longer in the model")
        W = params[key].data if index is None else params[key].data[index]
        target = W.t() if transposed else W
        check_undo(target, u, name)
        B, A, s = merge_factors(rec.entries[name], W.device)
        work.append((name, target, B, A, s, u))
    failed = []
    for name, target, B, A, s, u in work:  # every weight, even if one is not restored bit for bit
        try:
            undo_recorded(target, B, A, s, u, name)
        except ExactUndoError:
            failed.append(name)
    if failed:
        records.remove(rec)  # the weights are no longer the merged ones: the record is spent
        raise ExactUndoError(f"{len(failed)} of {len(work)} weights were restored to within rounding but not bit for "
                             f"bit (first: module {failed[0]}); the merge's delta was not recomputed identically")
