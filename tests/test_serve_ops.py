"""lora_shrink and lora_expand_ (the serving ops) on every backend, against float64 arithmetic."""

import pytest
import torch

from helpers import CUDA, DTYPES, ulp_distance
from portllm import ops

# (backend, device, forced CPU vector path): the C++ kernels on every path this CPU runs
CASES = [("reference", "cpu", None), ("cpp", "cpu", None), ("cpp", "cpu", "avx512"), ("cpp", "cpu", "avx2"),
         ("cpp", "cpu", "generic"), ("triton", "cpu", None), ("reference", "cuda", None), ("cuda", "cuda", None),
         ("triton", "cuda", None)]
# (T, n, m, P, R): single token, odd sizes, more tokens than a small tile (T > 256) and than the C++
# kernel's direct path (T >= 384), rank 64, more columns than one C++ work item (1024).
# and decode-sized calls (T <= 16: the C++ direct kernels) with vector tails along n and m.
SHAPES = [(1, 5, 7, 1, 1), (37, 70, 90, 3, 5), (300, 129, 65, 8, 16), (17, 33, 300, 2, 64), (400, 20, 1500, 3, 3),
          (12, 301, 517, 4, 13), (16, 256, 384, 8, 16)]
SLOTS = ["mixed", "one", "none"]


@pytest.fixture(params=CASES, ids=lambda c: "-".join(v for v in c if v))
def backend(request, monkeypatch):
    name, device, isa = request.param
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device")
    for op in ("lora_shrink", "lora_expand_"):
        reason = ops.backend_unavailable_reason(name, device, op)
        if reason is not None:
            pytest.skip(reason)
    if isa is not None:
        from portllm import _ext

        monkeypatch.setenv("PORTLLM_CPU_ISA", isa)
        if _ext.cpu_isa() != isa:
            pytest.skip(f"this CPU has no {isa} path (it runs {_ext.cpu_isa()})")
    return name, torch.device(device)


def make_slots(kind, T, P, gen):
    if kind == "mixed":  # every slot and "no patch" (-1), in random order
        return torch.randint(-1, P, (T,), generator=gen)
    if kind == "one":
        return torch.full((T,), P - 1)
    return torch.full((T,), -1)


def shrink_bound(x, A, slots):
    """|fp32 dot - exact| <= 2·(n + 2)·u·Σ|x||A| (Higham's dot-product bound, doubled)."""
    n = x.shape[1]
    mag = torch.zeros(x.shape[0], A.shape[1], dtype=torch.float64)
    for t, p in enumerate(slots.tolist()):
        if p >= 0:
            mag[t] = A[p].double().abs() @ x[t].double().abs()
    return 2 * (n + 2) * 2.0**-24 * mag + 1e-30


@pytest.mark.parametrize("kind", SLOTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n,m,P,R", SHAPES, ids=str)
def test_shrink(backend, T, n, m, P, R, dtype, kind):
    name, device = backend
    gen = torch.Generator().manual_seed(T * 31 + n + R)
    x = torch.randn(T, n, generator=gen).to(dtype)
    A = torch.randn(P, R, n, generator=gen).to(dtype)
    slots = make_slots(kind, T, P, gen)
    h = ops.lora_shrink(x.to(device), A.to(device), slots.to(device), backend=name).cpu()
    assert h.dtype == torch.float32 and h.shape == (T, R)
    exact = torch.zeros(T, R, dtype=torch.float64)
    for t, p in enumerate(slots.tolist()):
        if p >= 0:
            exact[t] = A[p].double() @ x[t].double()
    err = (h.double() - exact).abs()
    assert (err <= shrink_bound(x, A, slots)).all(), f"worst error {err.max().item():.3g}"
    assert (h[slots < 0] == 0).all()


@pytest.mark.parametrize("layout", ["rank_last", "slots"])
@pytest.mark.parametrize("kind", SLOTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,n,m,P,R", SHAPES, ids=str)
def test_expand(backend, T, n, m, P, R, dtype, kind, layout):
    """B [P, m, R] contiguous (rank last), or in portllm.serve's slot layout (stored [P, R, m], viewed
    [P, m, R]: unit stride along m, the vector paths' layout)."""
    name, device = backend
    gen = torch.Generator().manual_seed(T * 17 + m + R)
    y0 = torch.randn(T, m, generator=gen).to(dtype)
    h = torch.randn(T, R, generator=gen) * 3
    B = (torch.randn(P, m, R, generator=gen) * 0.2).to(dtype)
    if layout == "slots":
        B = B.transpose(1, 2).contiguous().transpose(1, 2)
    scale = torch.rand(P, generator=gen) + 0.5
    slots = make_slots(kind, T, P, gen)
    y = y0.clone().to(device)
    out = ops.lora_expand_(y, h.to(device), B.to(device), scale.to(device), slots.to(device), backend=name)
    assert out is y
    y = y.cpu()
    routed = slots >= 0
    assert torch.equal(y[~routed].view(torch.uint8), y0[~routed].view(torch.uint8)), "rows with no patch changed"
    if not routed.any():
        return
    exact = y0.double().clone()
    mag = y0.double().abs()
    for t, p in enumerate(slots.tolist()):
        if p >= 0:
            exact[t] += float(scale[p]) * (B[p].double() @ h[t].double())
            mag[t] += float(scale[p]) * (B[p].double().abs() @ h[t].double().abs())
    bound = 2 * (R + 3) * 2.0**-24 * mag + 1e-30  # the fp32 sum's error
    err = (y.double() - exact).abs()
    if dtype == torch.float32:
        assert (err <= bound)[routed].all()
    else:  # one rounding of that fp32 sum: within a rounding step of it, nearly always correctly rounded
        fi = torch.finfo(dtype)
        step = torch.maximum(exact.abs() * fi.eps, torch.tensor(fi.smallest_normal * fi.eps, dtype=torch.float64))
        assert (err <= bound + step)[routed].all()
        ulps = ulp_distance(y, exact.to(dtype))[routed]
        if ulps.numel() >= 500:
            assert (ulps > 0).double().mean() <= 0.01


def test_opcheck(backend):
    """The registered ops pass torch.library.opcheck (schema, fake tensors, mutation)."""
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is plain PyTorch, not a registered op")
    gen = torch.Generator().manual_seed(6)
    x, A = torch.randn(20, 33, generator=gen).to(device), torch.randn(3, 5, 33, generator=gen).to(device)
    slots = torch.tensor([0, 1, 2, -1] * 5, device=device)
    y, B = torch.randn(20, 17, generator=gen).to(device), torch.randn(3, 17, 5, generator=gen).to(device)
    h, s = torch.randn(20, 5, generator=gen).to(device), torch.rand(3, generator=gen).to(device)
    shrink, expand = {"triton": (torch.ops.portllm.lora_shrink_triton, torch.ops.portllm.lora_expand_triton_),
                      "cuda": (torch.ops.portllm.lora_shrink, torch.ops.portllm.lora_expand_),
                      "cpp": (torch.ops.portllm.lora_shrink, torch.ops.portllm.lora_expand_)}[name]
    torch.library.opcheck(shrink, (x, A, slots))
    torch.library.opcheck(expand, (y, h, B, s, slots))
