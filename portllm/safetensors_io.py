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

from portllm.direct_file import SequentialFile
from portllm.files import NotARegularFileError, open_regular

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the name {dup!r} appears twice")
    return dict(pairs)


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
            self._f = open_regular(path, "safetensors file")
        except NotARegularFileError as e:
            raise SafetensorsError(str(e)) from None
        except OSError as e:
            raise SafetensorsError(f"{path}: cannot open ({e.strerror})") from None
        self.stat = os.fstat(self._f.fileno())  # as opened: InputWatch compares against it
        size = self.stat.st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {size})")
        self._header = self._f.read(n)
        try:
            header = json.loads(self._header, object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as e:
            self._f.close()
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
        try:
            self._parse(header, 8 + n, size)
        except SafetensorsError:
            self._f.close()
            raise

    def _parse(self, header, data_start: int, size: int):
        """Validates the header as strictly as the safetensors library: a JSON object; string-to-string
        metadata; known dtypes; non-negative integer shapes and offsets; each tensor's byte count
        equal to its shape's; tensors contiguous, in order, without gaps or overlaps, filling the
        data section exactly."""
        path = self.path
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise SafetensorsError(f"{path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, h in header.items():
            try:
                dtype = DTYPES[h["dtype"]]
                shape, offs = h["shape"], h["data_offsets"]
                if not (isinstance(shape, list) and isinstance(offs, list) and len(offs) == 2):
                    raise TypeError
                if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offs):
                    raise ValueError
                shape = tuple(shape)
                b, e = offs
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {h!r} (dtype one of "
                                       f"{', '.join(DTYPES)}; shape and data_offsets non-negative integers)") from None
            numel = 1
            for d in shape:
                numel *= d
            if e < b or e - b != numel * torch.empty((), dtype=dtype).element_size():
                raise SafetensorsError(f"{path}: tensor {name!r} {shape} {h['dtype']} has data_offsets [{b}, {e}], "
                                       f"which do not hold {numel} elements")
            spans.append((b, e, name))
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
        end = 0
        for b, e, name in sorted(spans):
            if b != end:
                raise SafetensorsError(f"{path}: tensor {name!r} starts at data offset {b}, expected {end} "
                                       "(tensors must be contiguous, in order, and must not overlap)")
            end = e
        if data_start + end != size:
            if data_start + end > size:
                raise SafetensorsError(f"{path}: truncated: the tensors end at byte {data_start + end}, "
                                       f"the file has {size}")
            raise SafetensorsError(f"{path}: {size - data_start - end} bytes after the last tensor's data "
                                   "(the header does not describe the whole file)")

    def keys(self):
        return self.tensors.keys()

    def header_unchanged(self) -> bool:
        """Whether the file still starts with the header read when it was opened."""
        self._f.seek(0)
        head = self._f.read(8 + len(self._header))
        return head[8:] == self._header and struct.unpack("<Q", head[:8])[0] == len(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def fileno(self) -> int:
        return self._f.fileno()

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        self.read_into(name, 0, buf)
        return buf.view(info.dtype).reshape(info.shape)

    def read_into(self, name: str, offset: int, buf: torch.Tensor):
        """Fills the uint8 CPU tensor ``buf`` with tensor ``name``'s bytes from byte ``offset`` on."""
        info = self.tensors[name]
        n = buf.numel()
        if offset < 0 or offset + n > info.nbytes:
            raise ValueError(f"{self.path}: bytes [{offset}, {offset + n}) are outside tensor {name!r} "
                             f"({info.nbytes} bytes)")
        view, got = memoryview(buf.numpy()), 0
        # Positional reads (no shared file position): tensors may be read from two threads at once.
        while got < n:
            k = os.preadv(self._f.fileno(), [view[got:]], info.begin + offset + got)
            if k <= 0:
                raise SafetensorsError(f"{self.path}: truncated while reading {name!r}")
            got += k

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
    data then follow in the declared order: a whole tensor (``write``), or a tensor in consecutive
    parts (``write_part``, ``copy_part``: bytes read from another file), through
    ``portllm.direct_file.SequentialFile`` (O_DIRECT where the file system has it; fsync at close)."""

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
        head = struct.pack("<Q", len(raw)) + raw
        self._out = SequentialFile(path, len(head) + offset)  # O_DIRECT where the file system has it
        self._next = 0  # the tensor being written, and how many of its bytes are
        self._part = 0
        self._out.append(torch.frombuffer(bytearray(head), dtype=torch.uint8))

    def _advance(self, name: str, nbytes: int):
        """Checks that ``nbytes`` more bytes of tensor ``name`` come next, and counts them."""
        if self._next == len(self._order):
            raise ValueError(f"{self.path}: every declared tensor is written; got more bytes of {name!r}")
        exp_name, _, _, total = self._order[self._next]
        if name != exp_name or self._part + nbytes > total:
            raise ValueError(f"{self.path}: expected {total - self._part} more bytes of tensor {exp_name!r}, got "
                             f"{nbytes} of {name!r}")
        self._part += nbytes
        if self._part == total:
            self._next, self._part = self._next + 1, 0

    def write(self, name: str, t: torch.Tensor):
        exp_name, dtype, shape, _ = self._order[self._next] if self._next < len(self._order) else (
            None, None, None, 0)
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape or self._part:
            raise ValueError(f"{self.path}: expected tensor {exp_name!r} {shape} {dtype}, got {name!r} "
                             f"{tuple(t.shape)} {t.dtype}")
        self.write_part(name, t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))

    def write_part(self, name: str, data: torch.Tensor):
        """The next bytes of tensor ``name``: ``data``, a contiguous uint8 CPU tensor."""
        self._advance(name, data.numel())
        self._out.append(data)

    def copy_part(self, name: str, src_fd: int, offset: int, nbytes: int):
        """The next ``nbytes`` bytes of tensor ``name``, read from the file ``src_fd`` at ``offset``
        straight into the output's staging buffer."""
        self._advance(name, nbytes)
        self._out.append_from(src_fd, offset, nbytes, f"{self.path}: the source of tensor {name!r}")

    @property
    def complete(self) -> bool:
        """Whether every declared tensor has been written."""
        return self._next == len(self._order)

    def abort(self):
        """Closes the file without completing it (the caller removes it)."""
        self._out.abort()

    def close(self):
        """Writes the rest, fsyncs and closes the file; a file closed before its last tensor is refused."""
        if not self.complete:
            self._out.abort()
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._out.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """A whole small file (a patch), written to a temporary name and renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}-{id(tensors):x}"
    try:
        with SafetensorsWriter(tmp, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata) as w:
            for k, v in tensors.items():
                w.write(k, v)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
