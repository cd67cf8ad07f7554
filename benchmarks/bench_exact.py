"""Exact undo, in one run:

* ``exact_undo``: bf16 W 4096×14336, r = 16, a delta of 2% of W: the default merge (patch_add_),
  apply(exact=True)'s recorded merge, its undo, and the plain (inexact) undo; bits stored per weight.
* ``bit_misses``: the comparison the exact merge runs per 4 Mi-element chunk (where two int16 bit
  patterns differ, ~2.3% of them, and by how much), per backend (``bit_misses-<backend>``; the C++
  kernel once per CPU vector path, forced with PORTLLM_CPU_ISA, so that every path's defaults rest
  on a measurement).
"""

import os

import pytest
import torch
from benchutil import DEVICE, QUICK, sync
from suite import Suite

from portllm import _ext, ops
from portllm.exact import merge_recorded, undo_recorded

DTYPE = torch.bfloat16
RANK = 16
ROUNDS = 3 if QUICK else (50 if DEVICE.type == "cuda" else 20)
UNDO_SHAPE = (256, 512) if QUICK else (4096, 14336)


@pytest.mark.parametrize("provider", ["merge (patch_add_)", "apply exact=True", "remove exact", "remove inexact"])
def test_exact_undo(benchmark, provider):
    m, n = UNDO_SHAPE
    g = torch.Generator(device=DEVICE).manual_seed(3)
    W = torch.randn(m, n, generator=g, device=DEVICE).to(DTYPE)
    B = torch.randn(m, RANK, generator=g, device=DEVICE)
    A = torch.randn(RANK, n, generator=g, device=DEVICE)
    s = torch.full((RANK,), 0.02 / float((B @ A).std()), device=DEVICE)  # the delta: 2% of W's RMS
    state = {}

    def merge_exact():
        state["u"] = merge_recorded(W, B, A, s)

    def undo_exact():
        undo_recorded(W, B, A, s, state["u"], "W")

    merge_exact()  # one recorded merge and its undo: the side information's size
    u = state.pop("u")
    undo_recorded(W, B, A, s, u, "W")
    setup = None
    if provider == "merge (patch_add_)":
        def fn():
            ops.patch_add_(W, B, A, s)
    elif provider == "remove inexact":
        def fn():
            ops.patch_add_(W, B, A, -s)
    elif provider == "apply exact=True":
        fn = merge_exact

        def setup():  # each round merges the original W
            if "u" in state:
                undo_exact()
                del state["u"]
            sync()
    else:
        fn = undo_exact

        def setup():
            merge_exact()
            sync()

    def call():
        fn()
        sync()

    benchmark.group = "exact undo"
    benchmark.extra_info.update(dict(op="exact_undo", provider=provider, m=m, n=n, r=RANK, dtype="bfloat16",
                                     relative_delta=0.02, bytes=2 * m * n * 2, exceptions=u.exceptions,
                                     bits_per_weight=round(8 * u.nbytes / (m * n), 4)))
    if setup is None:
        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    else:
        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, iterations=1)


MISS_N = 1 << 16 if QUICK else 1 << 22  # the exact merge's chunk (portllm.exact._CHUNK_ELEMS)
MISS_DENSITY = 0.023  # random bf16 weights at a 2% relative delta
_ISA_ORDER = ("generic", "avx2", "avx512", "avx512bf16")
_ISAS = (list(reversed(_ISA_ORDER[: _ISA_ORDER.index(_ext.cpu_isa()) + 1]))
         if DEVICE.type == "cpu" and _ext.cpu_isa() in _ISA_ORDER else [""])
MISS_PROVIDERS = [f"bit_misses-{b}" + (f"@{isa}" if isa else "") for b in ops.available_backends(DEVICE, "bit_misses")
                  for isa in (_ISAS if b == "cpp" else [""])]


@pytest.mark.parametrize("provider", MISS_PROVIDERS)
def test_bit_misses(benchmark, provider):
    backend, _, isa = provider.removeprefix("bit_misses-").partition("@")
    g = torch.Generator(device=DEVICE).manual_seed(4)
    a = torch.randint(-2**15, 2**15, (MISS_N,), generator=g, device=DEVICE, dtype=torch.int32).to(torch.int16)
    flip = torch.rand(MISS_N, generator=g, device=DEVICE) < MISS_DENSITY
    b = torch.where(flip, a + 1, a)
    old = os.environ.get("PORTLLM_CPU_ISA")

    def call():
        if isa:
            os.environ["PORTLLM_CPU_ISA"] = isa
        try:
            ops.bit_misses(a, b, backend=backend)
        finally:
            if isa:
                os.environ.pop("PORTLLM_CPU_ISA") if old is None else os.environ.update(PORTLLM_CPU_ISA=old)
        sync()

    call()
    benchmark.group = "bit_misses"
    benchmark.extra_info.update(dict(op="bit_misses", provider=f"bit_misses-{backend}", isa=isa or None, n=MISS_N,
                                     dtype="int16", density=MISS_DENSITY, bytes=2 * MISS_N * 2))
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def derive(rows: list[dict]):
    """The exact merge and its undo against the plain merge, in the same run."""
    undo = {r["provider"]: r for r in rows if r["op"] == "exact_undo"}
    merge = undo.get("merge (patch_add_)")
    for r in undo.values():
        if merge is not None:
            r["time_vs_merge"] = round(r["median_ms"] / merge["median_ms"], 3)
    exact = undo.get("apply exact=True")
    if exact is not None and "remove exact" in undo:
        undo["remove exact"]["time_vs_exact_merge"] = round(undo["remove exact"]["median_ms"] / exact["median_ms"], 3)


def table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["op"] == "exact_undo":
            out.append(f"exact undo {r['provider']:<22} {r['median_ms']:>9.2f} ms  x merge {r.get('time_vs_merge', 1.0):.2f}  "
                       f"{r['bits_per_weight']:.3f} bits/weight")
        if r["op"] == "bit_misses":
            out.append(f"bit_misses {r['provider'] + ('@' + r['isa'] if r.get('isa') else ''):<30} "
                       f"{r['median_ms']:>9.3f} ms  {r['gbps']:.1f} GB/s")
    return out


SUITE = Suite("exact", frozenset({"exact_undo", "bit_misses"}), derive, table)
