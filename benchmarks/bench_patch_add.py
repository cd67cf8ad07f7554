"""patch_add_ (W += B·diag(s)·A, bf16) against the ways people do it today, in one run:

* ``portllm-<backend>``: every portllm backend available on the device (Triton only on GPU);
* ``torch.addmm_``: ``W.addmm_(B, A, alpha=s)``, in place;
* ``peft``: PEFT's merge, ``W += (B @ A) * s`` (materialises the m×n delta);
* ``copy``: ``W2.copy_(W)``, the bandwidth limit (reads and writes as many bytes as a merge);
* ``in-place``: ``W.mul_(1)``, the same bytes read and written in place (no second buffer: on a
  CPU it is faster than a copy, and bounds any in-place merge from above).

and four rank-16 patches merged in one pass against four ``addmm_`` calls.
"""

import pytest
import torch
from benchutil import DEVICE, QUICK, extra_peak_memory, sync

from portllm import ops

DTYPE = torch.bfloat16
if QUICK:
    SHAPES, RANKS, ROUNDS = [(256, 512)], (8, 16), 3
else:
    SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)] + ([(8192, 28672)] if DEVICE.type == "cuda" else [])
    RANKS, ROUNDS = (8, 16, 64), (50 if DEVICE.type == "cuda" else 10)
MULTI_SHAPE = SHAPES[1] if not QUICK else SHAPES[0]
SCALE = 0.5
BACKENDS = [b for b in ops.available_backends(DEVICE) if not (b == "triton" and DEVICE.type == "cpu")]
PROVIDERS = ["copy", "in-place", "torch.addmm_", "peft"] + [f"portllm-{b}" for b in BACKENDS]

_weights = {}


def weight(m, n):
    if (m, n) not in _weights:
        _weights.clear()  # one shape at a time: keeps peak memory to one W (and its copy target)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        _weights[(m, n)] = torch.randn(m, n, generator=g, device=DEVICE, dtype=DTYPE)
    return _weights[(m, n)]


def factors(m, n, r, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    B = (torch.randn(m, r, generator=g, device=DEVICE) * 0.01).to(DTYPE)
    A = (torch.randn(r, n, generator=g, device=DEVICE) * 0.01).to(DTYPE)
    return B, A


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
    backend = provider.removeprefix("portllm-")
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
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("m,n", SHAPES, ids=lambda v: str(v))
def test_patch_add(benchmark, m, n, r, provider):
    if provider in ("copy", "in-place") and r != RANKS[0]:
        pytest.skip("does not depend on r: measured once per shape")
    W = weight(m, n)
    B, A = factors(m, n, r)
    w_bytes = W.numel() * W.element_size()
    f_bytes = B.numel() * B.element_size() + A.numel() * A.element_size()
    info = dict(op="patch_add_", case="single", m=m, n=n, r=r, dtype=str(DTYPE).removeprefix("torch."),
                provider=provider, bytes=2 * w_bytes + (0 if provider in ("copy", "in-place") else f_bytes),
                factor_bytes=f_bytes)
    run(benchmark, provider_fn(provider, W, B, A, SCALE), f"patch_add {m}x{n} r={r}", info)


MULTI_PROVIDERS = ["torch.addmm_ x4"] + [f"portllm-{b} one pass" for b in BACKENDS]


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
