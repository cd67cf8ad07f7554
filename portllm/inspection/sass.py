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


def stats(cubin_path: str, tool: str) -> dict:
    sass = subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    ops = Counter(_OP.findall(sass))
    m = _RES.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage {cubin_path}: no resource line")

    def widths(kind):
        out = Counter()
        for op, n in ops.items():
            if op.split(".")[0] == kind:
                out[width(op)] += n
        return {str(k): v for k, v in sorted(out.items())}

    return {
        "regs": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3)), "local": int(m.group(4)),
        "wgmma": sum(n for op, n in ops.items() if op.startswith("HGMMA")),
        "mma": sum(n for op, n in ops.items() if op.startswith("HMMA")),
        "ldg": widths("LDG"), "stg": widths("STG"),
        "cp_async": sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
        "tma": sum(n for op, n in ops.items() if op.startswith(("UTMALDG", "UBLKCP"))),
        "ldl_stl": sum(n for op, n in ops.items() if op.split(".")[0] in ("LDL", "STL")),
        "ffma": ops.get("FFMA", 0),
    }
