"""patch_add_ (W += B·diag(s)·A, bf16) against the ways people do it today, in one run:

* ``portllm-<backend>``: every portllm backend available on the device (Triton only on GPU);
* ``torch.addmm_``: ``W.addmm_(B, A, alpha=s)``, in place;
* ``peft``: PEFT's merge, ``W += (B @ A) * s`` (materialises the m×n delta);
* ``copy``: ``W2.copy_(W)``, the bandwidth limit (reads and writes as many bytes as a merge);
* ``in-place``: ``W.mul_(1)``, the same bytes read and written in place (no second buffer);
* ``in-place int``: ``W.view(int16).add_(0)``, the same pass as integers. Which of these three is
  fastest depends on the CPU (an Intel Xeon with AVX-512 BF16 and AMX took 52 ms for the bf16
  ``mul_(1)`` of 4096x14336, 13 ms for the integer pass and 17 ms for a copy; on an AMD EPYC the
  bf16 pass was fastest), so the limit a merge is held against is the fastest of the three in the
  same run (``limit_pass`` names it), or the FMA floor where that is slower.

and four rank-16 patches merged in one pass against four ``addmm_`` calls. Factors in bf16 and in
fp32 (PEFT saves adapters in fp32; ``addmm_`` and PEFT's way then need a cast, so they run on bf16
factors only). On a CPU, the cpp backend runs once per vector path this CPU has
(``portllm-cpp`` with ``isa`` = avx512bf16, avx512, avx2, generic; forced with PORTLLM_CPU_ISA),
and ``fma-floor`` records the time of 2·m·n·r flops at the FMA rate of that path measured in this
run (``benchmarks/fma_peak.py``).
"""

import os

import pytest
import torch
from benchutil import DEVICE, QUICK, extra_peak_memory, sync
from suite import Suite, fmt

from portllm import _ext, ops

DTYPE = torch.bfloat16
if QUICK:
    SHAPES, RANKS, ROUNDS = [(256, 512)], (8, 16), 3
else:
    SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)] + ([(8192, 28672)] if DEVICE.type == "cuda" else [])
    RANKS, ROUNDS = (8, 16, 64), (50 if DEVICE.type == "cuda" else 10)
MULTI_SHAPE = SHAPES[1] if not QUICK else SHAPES[0]
SCALE = 0.5
BACKENDS = [b for b in ops.available_backends(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]
FACTOR_DTYPES = (torch.bfloat16, torch.float32)
_ISA_ORDER = ("generic", "avx2", "avx512", "avx512bf16")


def cpu_isas() -> list[str]:
    """The CPU vector paths this machine runs, widest first."""
    if DEVICE.type != "cpu" or "cpp" not in BACKENDS:
        return []
    best = _ISA_ORDER.index(_ext.cpu_isa()) if _ext.cpu_isa() in _ISA_ORDER else 0
    return list(reversed(_ISA_ORDER[: best + 1]))


ISAS = cpu_isas()
PASSES = ("copy", "in-place", "in-place int")  # each reads and writes W's bytes once, as a merge does
PROVIDERS = [*PASSES, "torch.addmm_", "peft"] + [
    f"portllm-{b}" + (f"@{isa}" if b == "cpp" else "") for b in BACKENDS for isa in (ISAS if b == "cpp" else [""])
] + (["fma-floor@" + isa for isa in ISAS] if not QUICK else [])

_weights = {}


def weight(m, n):
    if (m, n) not in _weights:
        _weights.clear()  # one shape at a time: keeps peak memory to one W (and its copy target)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        _weights[(m, n)] = torch.randn(m, n, generator=g, device=DEVICE, dtype=DTYPE)
    return _weights[(m, n)]


def factors(m, n, r, seed=1, dtype=DTYPE):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B = (torch.randn(m, r, generator=g, device=DEVICE) * 0.01).to(dtype)
    A = (torch.randn(r, n, generator=g, device=DEVICE) * 0.01).to(dtype)
    return B, A


_peaks = {}


def fma_gflops(isa: str) -> float:
    """fp32 FMA rate of a CPU path on every core torch uses, measured once per run."""
    if isa not in _peaks:
        from fma_peak import peak_gflops

        _peaks[isa] = peak_gflops(isa, torch.get_num_threads())
    return _peaks[isa]


def provider_fn(provider, W, B, A, scale):
    if provider == "copy":
        W2 = torch.empty_like(W)
        return lambda: W2.copy_(W)
    if provider == "in-place":
        return lambda: W.mul_(1.0)
    if provider == "in-place int":
        Wi = W.view(torch.int16)
        return lambda: Wi.add_(0)
    if provider == "torch.addmm_":
        return lambda: W.addmm_(B, A, alpha=scale)
    if provider == "peft":
        return lambda: W.add_((B @ A) * scale)
    backend, _, isa = provider.removeprefix("portllm-").partition("@")
    if isa:
        def fn():
            os.environ["PORTLLM_CPU_ISA"] = isa
            try:
                ops.patch_add_(W, B, A, scale, backend=backend)
            finally:
                del os.environ["PORTLLM_CPU_ISA"]
        return fn
    return lambda: ops.patch_add_(W, B, A, scale, backend=backend)


def run(benchmark, fn, group, info):
    def call():
        fn()
        sync()

    call()  # warm-up: kernel compilation, allocator
    info["extra_peak_bytes"] = extra_peak_memory(call)
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES, ids=str)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,n", SHAPES, ids=lambda v: str(v))
def test_patch_add(benchmark, m, n, r, factor_dtype, provider):
    if provider in PASSES and (r != RANKS[0] or factor_dtype != DTYPE):
        pytest.skip("does not depend on r or the factors: measured once per shape")
    if provider in ("torch.addmm_", "peft") and factor_dtype != DTYPE:
        pytest.skip("addmm_ and PEFT's add need factors in W's dtype")
    base, _, isa = provider.partition("@")
    W = weight(m, n)
    B, A = factors(m, n, r, dtype=factor_dtype)
    w_bytes = W.numel() * W.element_size()
    f_bytes = B.numel() * B.element_size() + A.numel() * A.element_size()
    info = dict(op="patch_add_", case="single", m=m, n=n, r=r, dtype=str(DTYPE).removeprefix("torch."),
                factor_dtype=str(factor_dtype).removeprefix("torch."), provider=base,
                bytes=2 * w_bytes + (0 if provider in PASSES else f_bytes), factor_bytes=f_bytes)
    if isa:
        info["isa"] = isa
    if base == "fma-floor":
        # Not a run: the time 2·m·n·r flops take at this path's measured FMA rate.
        seconds = 2 * m * n * r / (fma_gflops(isa) * 1e9)
        info.update(fma_gflops=round(fma_gflops(isa), 1), floor_seconds=seconds)
        benchmark.extra_info.update(info)
        benchmark.group = f"patch_add {m}x{n} r={r}"
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        return
    run(benchmark, provider_fn(provider, W, B, A, SCALE), f"patch_add {m}x{n} r={r} {factor_dtype}", info)


MULTI_PROVIDERS = ["torch.addmm_ x4"] + [f"portllm-{b} one pass" for b in BACKENDS]  # (default CPU path)


@pytest.mark.parametrize("provider", MULTI_PROVIDERS)
def test_patch_add_four_patches(benchmark, provider):
    m, n = MULTI_SHAPE
    W = weight(m, n)
    patches = [factors(m, n, 16, seed=10 + i) for i in range(4)]
    scales = [0.5, 1.0, 2.0, 0.25]
    f_bytes = sum(b.numel() * b.element_size() + a.numel() * a.element_size() for b, a in patches)
    if provider == "torch.addmm_ x4":
        def fn():
            for (b, a), s in zip(patches, scales):
                W.addmm_(b, a, alpha=s)
    else:
        backend = provider.split()[0].removeprefix("portllm-")
        B = torch.cat([b for b, _ in patches], dim=1)
        A = torch.cat([a for _, a in patches], dim=0)
        s = torch.cat([torch.full((16,), x, device=DEVICE) for x in scales])

        def fn():
            ops.patch_add_(W, B, A, s, backend=backend)
    info = dict(op="patch_add_", case="four_rank16_patches", m=m, n=n, r=64, dtype="bfloat16", provider=provider,
                bytes=2 * W.numel() * W.element_size() + f_bytes, factor_bytes=f_bytes)
    run(benchmark, fn, f"four rank-16 patches {m}x{n}", info)


def derive(rows: list[dict]):
    """Each merge against what ran in the same run: the copy, the fastest pass over W's bytes
    (``limit_pass``), ``addmm_``, the reference; on a CPU path, the time over its limit =
    max(fastest pass, that path's FMA floor)."""
    pa = [r for r in rows if r["op"] == "patch_add_"]
    copy = {(r["m"], r["n"]): r for r in pa if r["provider"] == "copy"}
    fastest: dict = {}
    for r in pa:
        if r["provider"] in PASSES:
            best = fastest.get((r["m"], r["n"]))
            if best is None or r["median_ms"] < best["median_ms"]:
                fastest[(r["m"], r["n"])] = r
    addmm = {(r["case"], r["m"], r["n"], r["r"]): r for r in pa if r["provider"].startswith("torch.addmm_")}
    ref = {(r["case"], r["m"], r["n"], r["r"], r.get("factor_dtype")): r for r in pa
           if r["provider"] == "portllm-reference"}
    floor = {(r["m"], r["n"], r["r"], r["isa"]): r for r in pa if r["provider"] == "fma-floor"}
    for r in pa:
        c, p = copy.get((r["m"], r["n"])), fastest.get((r["m"], r["n"]))
        if c is not None:
            r["fraction_of_copy_bandwidth"] = round(r["gbps"] / c["gbps"], 3)
        if p is not None:
            r["fraction_of_fastest_pass"] = round(r["gbps"] / p["gbps"], 3)
        a = addmm.get((r["case"], r["m"], r["n"], r["r"]))
        if a is not None:
            r["speedup_vs_addmm_"] = round(a["median_ms"] / r["median_ms"], 3)
        f = ref.get((r["case"], r["m"], r["n"], r["r"], r.get("factor_dtype")))
        if f is not None and r["provider"].startswith("portllm-"):
            r["speedup_vs_reference"] = round(f["median_ms"] / r["median_ms"], 3)
        fl = floor.get((r["m"], r["n"], r["r"], r.get("isa")))
        if fl is not None and p is not None and r["provider"] == "portllm-cpp":
            limit, which = max((fl["median_ms"], f"fma-floor@{r['isa']}"), (p["median_ms"], p["provider"]))
            r["limit_ms"], r["limit_pass"] = round(limit, 3), which
            r["time_vs_limit"] = round(r["median_ms"] / limit, 3)



def table(rows: list[dict]) -> list[str]:
    pa = [r for r in rows if r["op"] == "patch_add_"]
    if not pa:
        return []
    out = [f"{'case':<26} {'factors':<9} {'provider':<26} {'median ms':>10} {'GB/s':>8} {'x copy':>7} "
           f"{'x fastest':>9} {'x addmm_':>8} {'/ limit':>7} {'extra MiB':>9}"]
    fastest: dict = {}
    for r in pa:
        case = f"{r['m']}x{r['n']} r={r['r']}" + (" (4 patches)" if r["case"] != "single" else "")
        extra = r.get("extra_peak_bytes")
        prov = r["provider"] + (f"@{r['isa']}" if r.get("isa") and "@" not in r["provider"] else "")
        out.append(f"{case:<26} {r.get('factor_dtype', ''):<9} {prov:<26} {r['median_ms']:>10.3f} {r['gbps']:>8.1f} "
                   f"{fmt(r.get('fraction_of_copy_bandwidth')):>7} {fmt(r.get('fraction_of_fastest_pass')):>9} "
                   f"{fmt(r.get('speedup_vs_addmm_')):>8} {fmt(r.get('time_vs_limit')):>7} "
                   f"{fmt(extra / 2**20 if extra is not None else None, '.1f'):>9}")
        if r["provider"] in PASSES:
            best = fastest.get((r["m"], r["n"]))
            if best is None or r["median_ms"] < best["median_ms"]:
                fastest[(r["m"], r["n"])] = r
    for (m, n), r in sorted(fastest.items()):
        out.append(f"fastest pass over W's bytes, {m}x{n}: {r['provider']} ({r['median_ms']:.3f} ms)")
    return out


SUITE = Suite("patch_add", frozenset({"patch_add_"}), derive, table)
