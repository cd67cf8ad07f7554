"""The checks of a design against its compiled stats (``sass.stats``): (passed, what was seen)."""

from __future__ import annotations

REGISTERS_PER_SM = 65536


def tensor_cores(st: dict, arch: str, design) -> tuple[bool, str]:
    n = st["wgmma"] + st["mma"]
    return n > 0, f"{st['wgmma']} wgmma (HGMMA), {st['mma']} mma.sync (HMMA) instructions"


def wgmma(st: dict, arch: str, design) -> tuple[bool, str]:
    """On sm_90a, Hopper's warpgroup MMA (tiles of 64 rows and more); nothing to check on sm_80."""
    if arch != "sm_90a":
        return True, "n/a before sm_90"
    return st["wgmma"] > 0, f"{st['wgmma']} wgmma (HGMMA), {st['mma']} mma.sync (HMMA) instructions"


def no_spills(st: dict, arch: str, design) -> tuple[bool, str]:
    ok = st["local"] == 0 and st["stack"] == 0 and st["ldl_stl"] == 0
    return ok, f"{st['local']} bytes local, {st['stack']} bytes stack, {st['ldl_stl']} LDL/STL"


def w_128bit(st: dict, arch: str, design) -> tuple[bool, str]:
    stg = st["stg"]
    ok = st["ldg"].get("128", 0) > 0 and set(stg) == {"128"}
    return ok, f"LDG by width {st['ldg']}, STG by width {stg}"


def factor_loads(st: dict, arch: str, design) -> tuple[bool, str]:
    narrow = st["ldg"].get("16", 0) + st["ldg"].get("8", 0)
    return narrow == 0, f"{narrow} scalar 16/8-bit loads, {st['cp_async']} cp.async, LDG by width {st['ldg']}"


def registers(st: dict, arch: str, design) -> tuple[bool, str]:
    need = st["regs"] * st["threads"] * design.ctas
    return need <= REGISTERS_PER_SM, (f"{st['regs']} registers × {st['threads']} threads × {design.ctas} blocks = "
                                      f"{need} of {REGISTERS_PER_SM}")


CHECKS = {f.__name__: f for f in (tensor_cores, wgmma, no_spills, w_128bit, factor_loads, registers)}
