"""Counting what a cubin holds: cuobjdump's SASS listing (static instruction counts, not executed
ones) and its resource usage (registers, local memory: spills and stack, shared memory)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter

_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def width(op: str) -> int:
    """Bits per thread of a global load or store (LDG.E.128: 128; LDG.E.U16: 16; LDG.E: 32)."""
    mods = op.split(".")[1:]
    for w in ("128", "64"):
        if w in mods:
            return int(w)
    if any(m in ("U16", "S16") for m in mods):
        return 16
    if any(m in ("U8", "S8") for m in mods):
        return 8
    return 32


def _summary(ops: Counter, regs: int, stack: int, shared: int, local: int) -> dict:
    def widths(kind):
        out = Counter()
        for op, n in ops.items():
            if op.split(".")[0] == kind:
                out[width(op)] += n
        return {str(k): v for k, v in sorted(out.items())}

    return {
        "regs": regs, "stack": stack, "shared": shared, "local": local,
        "wgmma": sum(n for op, n in ops.items() if op.startswith("HGMMA")),
        "mma": sum(n for op, n in ops.items() if op.startswith("HMMA")),
        "ldg": widths("LDG"), "stg": widths("STG"),
        "cp_async": sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
        "tma": sum(n for op, n in ops.items() if op.startswith(("UTMALDG", "UBLKCP"))),
        "ldl_stl": sum(n for op, n in ops.items() if op.split(".")[0] in ("LDL", "STL")),
        "ffma": ops.get("FFMA", 0),
    }


def stats(cubin_path: str, tool: str) -> dict:
    """The stats of a cubin holding one kernel (Triton's)."""
    sass = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage {cubin_path}: no resource line")
    return _summary(Counter(_OP.findall(sass)), *(int(g) for g in m.groups()))


_ARCH = re.compile(r"^arch = (sm_\w+)", re.M)
_FUNC = re.compile(r"Function\s*:?\s*(\S+?):?\s*$")


def _sections(text: str) -> dict:
    """{(arch, function): the lines of its section} of a cuobjdump listing of a fatbin (one section per
    architecture, one function after another within it)."""
    out, arch, fn = {}, None, None
    for line in text.splitlines():
        m = _ARCH.match(line.strip())
        if m:
            arch, fn = m.group(1), None
            continue
        m = _FUNC.search(line) if "Function" in line else None
        if m and arch:
            fn = m.group(1)
            out[(arch, fn)] = []
            continue
        if fn is not None:
            out[(arch, fn)].append(line)
    return out


def stats_by_function(obj_path: str, tool: str) -> dict:
    """{arch: {mangled function name: stats}} of every kernel in an object or fatbin (nvcc's output:
    one cubin per architecture, several kernels in each)."""
    sass = subprocess.run([tool, "-sass", obj_path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", obj_path], capture_output=True, text=True, check=True).stdout
    usage = {k: _RES.search("\n".join(v)) for k, v in _sections(res).items()}
    out: dict = {}
    for (arch, fn), lines in _sections(sass).items():
        m = usage.get((arch, fn))
        if m is None:
            raise RuntimeError(f"cuobjdump -res-usage {obj_path}: no resource line for {fn} ({arch})")
        ops = Counter(_OP.findall("\n".join(lines)))
        out.setdefault(arch, {})[fn] = _summary(ops, *(int(g) for g in m.groups()))
    return out
