"""Streaming safetensors: read one tensor at a time with plain reads, write one at a time.

The ``safetensors`` package reads through a memory map (every page touched stays in the process's
resident set until the file is closed) and writes a whole file from tensors held in memory. Porting a
checkpoint needs neither: this module reads a tensor into its own buffer and writes each tensor as
soon as it is ready, so the memory held is about one tensor, whatever the checkpoint's size.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data; offsets are relative to the end of the header. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as one: the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsReader:
    """Reads a .safetensors file's header, then tensors one at a time (``reader[name]``)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = open(path, "rb")
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot open ({e.strerror})") from None
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_start = 8 + n
        for name, h in header.items():
            try:
                dtype = DTYPES[h["dtype"]]
                shape = tuple(int(s) for s in h["shape"])
                b, e = (int(x) for x in h["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {h}") from None
            numel = 1
            for s in shape:
                numel *= s
            if e - b != numel * torch.empty((), dtype=dtype).element_size():
                raise SafetensorsError(f"{path}: tensor {name!r} {shape} {h['dtype']} has {e - b} bytes of data")
            if data_start + e > size:
                raise SafetensorsError(
                    f"{path}: truncated: tensor {name!r} ends at byte {data_start + e}, the file has {size}")
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e)

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self._f.seek(info.begin)
        got = self._f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise SafetensorsError(f"{self.path}: truncated while reading {name!r}")
        return buf.view(info.dtype).reshape(info.shape)

    def elements(self, name: str, positions: list[int]) -> torch.Tensor:
        """Elements of a tensor at flat positions, read one by one (no whole-tensor read)."""
        info = self.tensors[name]
        size = torch.empty((), dtype=info.dtype).element_size()
        raw = bytearray()
        for p in positions:
            self._f.seek(info.begin + p * size)
            raw += self._f.read(size)
        if len(raw) != size * len(positions):
            raise SafetensorsError(f"{self.path}: truncated while reading {name!r}")
        return torch.frombuffer(raw, dtype=info.dtype) if raw else torch.zeros(0, dtype=info.dtype)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Writes a .safetensors file whose tensors' names, dtypes and shapes are known up front; the
    data then follow one tensor at a time, in the declared order."""

    def __init__(self, path: str, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        self._order = []
        for name, dtype, shape in layout:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(shape), nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor):
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor {exp_name!r} {shape} {dtype}, got {name!r} "
                             f"{tuple(t.shape)} {t.dtype}")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))
        self._next += 1

    @property
    def complete(self) -> bool:
        """Whether every declared tensor has been written."""
        return self._next == len(self._order)

    def abort(self):
        """Closes the file without completing it (the caller removes it)."""
        if not self._f.closed:
            self._f.close()

    def close(self):
        if not self.complete:
            self._f.close()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """A whole small file (a patch), written to a temporary name and renamed into place."""
    tmp = path + ".tmp"
    with SafetensorsWriter(tmp, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    os.replace(tmp, path)
