"""patch_add_ (W += B·diag(s)·A, bf16) against the ways people do it today, in one run:

* ``portllm-<backend>``: every portllm backend available on the device (Triton only on GPU);
* ``torch.addmm_``: ``W.addmm_(B, A, alpha=s)``, in place;
* ``peft``: PEFT's merge, ``W += (B @ A) * s`` (materialises the m×n delta);
* ``copy``: ``W2.copy_(W)``, the bandwidth limit (reads and writes as many bytes as a merge);
* ``in-place``: ``W.mul_(1)``, the same bytes read and written in place (no second buffer: on a
  CPU it is faster than a copy, and bounds any in-place merge from above).

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
PROVIDERS = ["copy", "in-place", "torch.addmm_", "peft"] + [
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
    if provider in ("copy", "in-place") and (r != RANKS[0] or factor_dtype != DTYPE):
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
                bytes=2 * w_bytes + (0 if provider in ("copy", "in-place") else f_bytes), factor_bytes=f_bytes)
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
