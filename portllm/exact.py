"""Merges that undo bit for bit: ``apply_patch(..., exact=True)`` and the ``remove_patch`` that follows.

A merge rounds: W′ = round(W + Δ), with Δ = B·diag(s)·A summed in fp32. Undoing it by merging −Δ
gives round(W′ − Δ), which equals W for nearly every element but not all (the rounding of W′ lost
the low bits of W where |W′| reached a larger binade). So the merge records, in the same pass, the
elements where round(W′ − Δ) ≠ W, and the undo recomputes the same Δ, subtracts, and patches those
exceptions back. What is stored per weight:

* the exceptions' positions, as gaps between consecutive positions in a byte stream (a byte
  0..254 advances by byte + 1 and marks an exception, 255 advances by 255 and marks none);
* for each, the distance from round(W′ − Δ) to W in representable values (an int8; ±1 nearly
  always), and, for the rare one that does not fit (or a signed zero), W's raw bits;
* checksums of W′ and of W, so that an undo that would not restore W bit for bit is refused
  before any weight is written, and one that did not is reported.

About 16 bits per exception: at a relative delta of 2% (2.6% exceptions on random bf16 weights)
that is about 0.4 bits per weight, against 16 for a golden copy.

Δ must be recomputed bit for bit, so it is always formed the same way: fp32 ``torch.mm`` of
(B·s) and A over fixed row chunks, TF32 off, on the device the merge ran on. The merge result
itself is round(W + Δ): one rounding of an fp32 sum, as every portllm merge.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Rows per chunk: the fp32 delta of a chunk stays near 4 MiB (cache-sized, as in the reference).
_CHUNK_ELEMS = 1 << 20
_INT = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
        torch.bfloat16: (torch.int16, 0x7FFF)}


class ExactUndoError(RuntimeError):
    """An exact undo cannot restore the weights bit for bit (they changed since the merge, or the
    delta cannot be recomputed identically); the message names the module."""


@dataclass
class WeightUndo:
    """What restores one weight: the exceptions of round(W′ − Δ) against W, encoded (see module)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device_type: str
    chunk_rows: int
    stream: torch.Tensor  # uint8: gap codes of every chunk, concatenated
    stream_offsets: list[int]  # per chunk: where its codes start (len chunks + 1)
    diff: torch.Tensor  # int8 [exceptions]: ord(W) - ord(round(W′ - Δ))
    diff_offsets: list[int]  # per chunk (len chunks + 1)
    far_index: torch.Tensor  # int64: flat positions whose W bits are stored raw
    far_bits: torch.Tensor  # W's raw bits there (int16/int32)
    sum_merged: int  # Σ bits of W′
    sum_original: int  # Σ bits of W

    @property
    def exceptions(self) -> int:
        return int(self.diff.numel())

    @property
    def nbytes(self) -> int:
        return (self.stream.numel() + self.diff.numel() + self.far_index.numel() * 8
                + self.far_bits.numel() * self.far_bits.element_size())


@contextmanager
def _no_tf32():
    """fp32 matmuls in full fp32 on CUDA while Δ is formed (the undo must form the same Δ)."""
    if not torch.cuda.is_available():
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _ordered(bits: torch.Tensor, mask: int) -> torch.Tensor:
    """Sign-magnitude float bits -> integers whose differences count representable values."""
    b = bits.to(torch.int64)
    mag = b & mask
    return torch.where(b < 0, -mag, mag)


def _from_ordered(o: torch.Tensor, int_dtype: torch.dtype, mask: int) -> torch.Tensor:
    sign_bit = -(mask + 1)  # the sign bit as a negative int64 (0x...8000)
    return torch.where(o < 0, (-o) | sign_bit, o).to(int_dtype)


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
    s = stream.to(torch.int64)
    pos = torch.where(s == 255, 255, s + 1).cumsum(0) - 1
    return pos[s != 255]


def _chunks(m: int, n: int):
    rows = max(1, _CHUNK_ELEMS // max(n, 1))
    return rows, range(0, m, rows)


def _bit_sum(t: torch.Tensor) -> int:
    return int(t.view(_INT[t.dtype][0]).sum(dtype=torch.int64))


def merge_recorded(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor) -> WeightUndo:
    """W ← round(W + B·diag(s)·A) in place (fp32 Δ, one rounding), returning what undoes it exactly."""
    int_dtype, mask = _INT[W.dtype]
    m, n = W.shape
    rows, starts = _chunks(m, n)
    Bs = B.to(torch.float32) * s.to(device=W.device, dtype=torch.float32)[None, :]
    Af = A.to(torch.float32)
    streams, diffs, far_i, far_b = [], [], [], []
    s_off, d_off = [0], [0]
    sum_merged = sum_original = 0
    with torch.no_grad(), _no_tf32():
        for i in starts:
            w = W[i:i + rows]
            w0 = w.contiguous().view(int_dtype).reshape(-1).clone()
            D = torch.mm(Bs[i:i + rows], Af)
            merged = (w.to(torch.float32) + D).to(W.dtype).contiguous()
            back = (merged.to(torch.float32) - D).to(W.dtype).view(int_dtype).reshape(-1)
            loc = (back != w0).nonzero().squeeze(1)
            d = _ordered(w0[loc], mask) - _ordered(back[loc], mask)
            small = d.clamp(-127, 127)
            far = (small != d) | (_from_ordered(_ordered(back[loc], mask) + small, int_dtype, mask) != w0[loc])
            streams.append(_encode_positions(loc))
            diffs.append(torch.where(far, 0, small).to(torch.int8))
            far_i.append(loc[far] + i * n)
            far_b.append(w0[loc[far]])
            s_off.append(s_off[-1] + streams[-1].numel())
            d_off.append(d_off[-1] + loc.numel())
            sum_original += int(w0.sum(dtype=torch.int64))
            w.copy_(merged)
            sum_merged += _bit_sum(merged)
    return WeightUndo((m, n), W.dtype, W.device.type, rows, torch.cat(streams), s_off, torch.cat(diffs), d_off,
                      torch.cat(far_i), torch.cat(far_b), sum_merged, sum_original)


def check_undo(W: torch.Tensor, u: WeightUndo, name: str):
    """Raises ExactUndoError naming ``name`` unless W is the weight ``u`` was recorded on, unchanged."""
    if tuple(W.shape) != u.shape or W.dtype != u.dtype:
        raise ExactUndoError(f"module {name}: the weight is {W.dtype} {tuple(W.shape)} but the merge was recorded "
                             f"on {u.dtype} {u.shape}")
    if W.device.type != u.device_type:
        raise ExactUndoError(f"module {name}: the merge was recorded on {u.device_type}, the weight is now on "
                             f"{W.device}; move the model back to undo exactly (or pass exact=False)")
    if _bit_sum(W) != u.sum_merged:
        raise ExactUndoError(f"module {name}: the weight changed since the exact merge (another merge, a training "
                             "step?); undo the later changes first, or pass exact=False to subtract the patch "
                             "with rounding")


def undo_recorded(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: torch.Tensor, u: WeightUndo,
                  name: str) -> None:
    """Restores W bit for bit from round(W + Δ) and ``u`` (check with ``check_undo`` first)."""
    int_dtype, mask = _INT[W.dtype]
    m, n = W.shape
    Bs = B.to(torch.float32) * s.to(device=W.device, dtype=torch.float32)[None, :]
    Af = A.to(torch.float32)
    total = 0
    with torch.no_grad(), _no_tf32():
        for c, i in enumerate(range(0, m, u.chunk_rows)):
            w = W[i:i + u.chunk_rows]
            D = torch.mm(Bs[i:i + u.chunk_rows], Af)
            back = (w.to(torch.float32) - D).to(W.dtype).contiguous()
            bits = back.view(int_dtype).view(-1)
            loc = _decode_positions(u.stream[u.stream_offsets[c]:u.stream_offsets[c + 1]])
            if loc.numel():
                d = u.diff[u.diff_offsets[c]:u.diff_offsets[c + 1]].to(torch.int64)
                bits[loc] = _from_ordered(_ordered(bits[loc], mask) + d, int_dtype, mask)
            lo, hi = i * n, (i + w.shape[0]) * n
            sel = (u.far_index >= lo) & (u.far_index < hi)
            if bool(sel.any()):
                bits[u.far_index[sel] - lo] = u.far_bits[sel]
            w.copy_(back)
            total += int(bits.sum(dtype=torch.int64))
    if total != u.sum_original:
        raise ExactUndoError(f"module {name}: the weight was restored to within rounding but not bit for bit (the "
                             "merge's delta was not recomputed identically: different torch or BLAS build?)")
