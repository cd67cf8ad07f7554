"""patch_add_ on every backend against the reference and against exact (float64) arithmetic."""

import pytest
import torch

from helpers import DTYPES, fp32_error_bound, ulp_distance
from portllm import ops, reference
from portllm.reference import patch_add_exact

# (m, n, r): odd shapes, single elements, a tall-thin one, ranks from 1 to 128.
SHAPES = [(1, 1, 1), (5, 123, 7), (4097, 31, 16), (33, 257, 128), (123, 5, 64), (70, 300, 33)]
LAYOUTS = ["contiguous", "row_slice", "col_slice", "transposed"]


_STORE_SHAPE = {"contiguous": lambda m, n: (m, n), "row_slice": lambda m, n: (3 * m, n),
                "col_slice": lambda m, n: (m, 3 * n), "transposed": lambda m, n: (n, m)}
# contiguous; the middle rows of a fused [q; k; v] weight; a column block of a wider weight
# (row stride 3n); a weight stored [n, m] and used as its transpose (stride(0) == 1).
_VIEW = {"contiguous": lambda b, m, n: b, "row_slice": lambda b, m, n: b[m : 2 * m],
         "col_slice": lambda b, m, n: b[:, n : 2 * n], "transposed": lambda b, m, n: b.t()}


def make_W(m, n, dtype, layout, device, gen):
    """W [m, n] with the given memory layout, and the tensor that owns its memory."""
    big = torch.randn(*_STORE_SHAPE[layout](m, n), generator=gen).to(device=device, dtype=dtype)
    W = _VIEW[layout](big, m, n)
    assert W.shape == (m, n)
    return W, big


def make_factors(m, n, r, dtype_b, dtype_a, device, gen):
    # Factor magnitudes like a trained LoRA's: the update is a few percent of W.
    B = (torch.randn(m, r, generator=gen) * 0.1).to(device=device, dtype=dtype_b)
    A = (torch.randn(r, n, generator=gen) * 0.1).to(device=device, dtype=dtype_a)
    return B, A


def check_against_reference(out, W0, B, A, scale, ref_out):
    """fp32: within the dot-product error bound of the exact result. bf16/fp16: within 1 ulp of the
    reference's fp32-accumulate-then-round, on every element."""
    exact = patch_add_exact(W0, B, A, scale)
    if out.dtype == torch.float32:
        err = (out.double() - exact).abs()
        bound = fp32_error_bound(W0, B, A, scale)
        worst = (err / bound).max().item()
        assert worst <= 1.0, f"fp32 error {worst:.3g}x the bound"
    else:
        ulps = ulp_distance(out, ref_out)
        assert ulps.max().item() <= 1, (
            f"{int((ulps > 1).sum())} elements differ from the reference by more than 1 ulp "
            f"(max {ulps.max().item()})"
        )
        # The reference itself is the correctly rounded result within 1 ulp.
        assert ulp_distance(ref_out, exact.to(out.dtype)).max().item() <= 1
        # One rounding, to nearest: elements that differ from the correctly rounded exact value
        # are those whose fp32 sum fell across a rounding boundary, a rare event. (A truncating
        # or double-rounding kernel is still within 1 ulp, but misses on about half the elements.)
        if out.numel() >= 200:
            miss = (ulp_distance(out, exact.to(out.dtype)) > 0).double().mean().item()
            assert miss <= 0.01, f"{miss:.1%} of elements are not the correctly rounded result"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,r", SHAPES, ids=lambda v: str(v))
def test_matches_reference(backend, m, n, r, dtype, layout):
    name, device = backend
    gen = torch.Generator().manual_seed(m * 1000 + n + r)
    W, big = make_W(m, n, dtype, layout, device, gen)
    B, A = make_factors(m, n, r, dtype, dtype, device, gen)
    scale = 0.37
    big0 = big.clone()
    W0 = W.clone()
    ref_out = reference.patch_add_(W0.clone(), B, A, torch.full((r,), scale, device=device))

    out = ops.patch_add_(W, B, A, scale, backend=name)

    assert out is W
    check_against_reference(W.cpu(), W0.cpu(), B.cpu(), A.cpu(), scale, ref_out.cpu())
    # Only W's own elements changed in the tensor that holds it (no writes past a slice).
    untouched = torch.ones_like(big, dtype=torch.bool)
    _VIEW[layout](untouched, m, n).fill_(False)
    assert torch.equal(big[untouched], big0[untouched])


@pytest.mark.parametrize("dtype_w", DTYPES, ids=str)
@pytest.mark.parametrize("dtype_b,dtype_a", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float16, torch.bfloat16)], ids=str)
def test_mixed_factor_dtypes(backend, dtype_w, dtype_b, dtype_a):
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    m, n, r = 67, 129, 9
    W, _ = make_W(m, n, dtype_w, "contiguous", device, gen)
    B, A = make_factors(m, n, r, dtype_b, dtype_a, device, gen)
    W0 = W.clone()
    ref_out = reference.patch_add_(W0.clone(), B, A, torch.full((r,), 2.0, device=device))
    ops.patch_add_(W, B, A, 2.0, backend=name)
    check_against_reference(W.cpu(), W0.cpu(), B.cpu(), A.cpu(), 2.0, ref_out.cpu())


def _assert_one_rounding(out, exact, sum_error):
    """Every element within half a step of W's dtype of the exact value plus ``sum_error``, and (200
    elements or more) at most 1% not the correctly rounded result."""
    fi = torch.finfo(out.dtype)
    step = torch.maximum(exact.abs() * fi.eps, torch.tensor(fi.smallest_normal * fi.eps, dtype=torch.float64))
    bound = step / 2 + sum_error
    err = (out.double() - exact).abs()
    assert (err <= bound).all(), f"worst error {(err / bound).max().item():.3g}x the bound"
    if out.numel() >= 200:
        miss = (ulp_distance(out, exact.to(out.dtype)) > 0).double().mean().item()
        assert miss <= 0.01, f"{miss:.1%} of elements are not the correctly rounded result"


@pytest.mark.parametrize("scales", ["one", "groups", "per_rank"])
@pytest.mark.parametrize("dtype_w", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m,n,r", [(5, 123, 7), (70, 300, 33), (129, 260, 64)], ids=str)
def test_fp32_factors_on_16bit_W(backend, m, n, r, dtype_w, scales):
    """fp32 factors (as PEFT saves them) on a bf16/fp16 W: every element within one rounding step of
    the exact value plus a near-fp32 sum's error (Triton forms the products from bf16 high and low
    parts of B·s and A, whose dropped low·low term is 2^-16 of a product), and nearly all
    correctly rounded."""
    name, device = backend
    gen = torch.Generator().manual_seed(m + r)
    W, _ = make_W(m, n, dtype_w, "contiguous", device, gen)
    B, A = make_factors(m, n, r, torch.float32, torch.float32, device, gen)
    s = {"one": torch.full((r,), 0.37), "per_rank": torch.rand(r, generator=gen) + 0.1,
         "groups": torch.tensor([0.5, -2.0, 3.0])[torch.arange(r) * 3 // r]}[scales]
    W0 = W.clone().cpu()
    ops.patch_add_(W, B, A, s.to(device), backend=name)
    out, Bc, Ac = W.cpu(), B.cpu(), A.cpu()
    mag = (Bc.double().abs() * s.double().abs()[None, :]) @ Ac.double().abs()
    _assert_one_rounding(out, patch_add_exact(W0, Bc, Ac, s), fp32_error_bound(W0, Bc, Ac, s) + 2 * 2.0**-16 * mag)


def test_per_rank_scale_merges_several_patches(backend):
    """Concatenated factors with one scale per rank == the patches' sum."""
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    m, n = 130, 77
    W, _ = make_W(m, n, torch.float32, "contiguous", device, gen)
    patches = [make_factors(m, n, r, torch.bfloat16, torch.bfloat16, device, gen) for r in (4, 16, 1)]
    scales = [0.5, -2.0, 3.0]
    B = torch.cat([b for b, _ in patches], dim=1)
    A = torch.cat([a for _, a in patches], dim=0)
    s = torch.cat([torch.full((b.shape[1],), sc) for (b, _), sc in zip(patches, scales)])
    expected = W.double().cpu()
    for (b, a), sc in zip(patches, scales):
        expected += sc * b.double().cpu() @ a.double().cpu()
    ops.patch_add_(W, B, A, s.to(device), backend=name)
    bound = fp32_error_bound(W.cpu(), B.cpu(), A.cpu(), s.abs().max().item())
    assert ((W.double().cpu() - expected).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_several_patches_on_16bit_W_with_16bit_factors(backend, dtype):
    """16-bit W and factors, four concatenated patches of ranks 5, 16, 1 and 50 (72 ranks: groups that
    straddle the Triton kernel's 64-rank chunks and start off its alignment): within one rounding step
    of the exact value plus an fp32 sum's error, and nearly all correctly rounded."""
    name, device = backend
    gen = torch.Generator().manual_seed(21)
    m, n = 131, 260
    W, _ = make_W(m, n, dtype, "contiguous", device, gen)
    patches = [make_factors(m, n, r, dtype, dtype, device, gen) for r in (5, 16, 1, 50)]
    B = torch.cat([b for b, _ in patches], dim=1)
    A = torch.cat([a for _, a in patches], dim=0)
    s = torch.cat([torch.full((b.shape[1],), sc) for (b, _), sc in zip(patches, (0.5, -2.0, 3.0, 0.25))])
    W0 = W.clone().cpu()
    ops.patch_add_(W, B, A, s.to(device), backend=name)
    _assert_one_rounding(W.cpu(), patch_add_exact(W0, B.cpu(), A.cpu(), s), fp32_error_bound(W0, B.cpu(), A.cpu(), s))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(backend, dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    W, _ = make_W(513, 300, dtype, "contiguous", device, gen)
    B, A = make_factors(513, 300, 16, dtype, dtype, device, gen)
    outs = [ops.patch_add_(W.clone(), B, A, 0.7, backend=name) for _ in range(3)]
    assert all(torch.equal(o.view(torch.uint8), outs[0].view(torch.uint8)) for o in outs)


def test_cpp_independent_of_thread_count():
    if ops.backend_unavailable_reason("cpp", "cpu"):
        pytest.skip("cpp backend not built")
    gen = torch.Generator().manual_seed(5)
    W, _ = make_W(1000, 515, torch.bfloat16, "contiguous", "cpu", gen)
    B, A = make_factors(1000, 515, 16, torch.bfloat16, torch.bfloat16, "cpu", gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(ops.patch_add_(W.clone(), B, A, 0.5, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.parametrize("which", ["B", "A"])
def test_factor_sharing_memory_with_W(backend, which):
    """A factor that is a view of W's own memory is read before W is written."""
    name, device = backend
    gen = torch.Generator().manual_seed(2)
    m, n, r = 40, 50, 8
    store = torch.randn(m + r, n + r, generator=gen).to(device)
    W = store[:m, :n]
    B_view, A_view = store[:m, n : n + r], store[m : m + r, :n]
    B_free, A_free = make_factors(m, n, r, torch.float32, torch.float32, device, gen)
    B = B_view if which == "B" else B_free
    A = A_view if which == "A" else A_free
    expected = reference.patch_add_(W.clone(), B.clone(), A.clone(), torch.full((r,), 1.5, device=device))
    ops.patch_add_(W, B, A, 1.5, backend=name)
    bound = fp32_error_bound(W.cpu(), B.cpu(), A.cpu(), 1.5)
    assert ((W.double() - expected.double()).abs().cpu() <= 2 * bound).all()


def test_empty_and_rank_zero(backend):
    name, device = backend
    for m, n, r in [(0, 5, 3), (5, 0, 3), (4, 6, 0)]:
        W = torch.randn(m, n, device=device)
        W0 = W.clone()
        ops.patch_add_(W, torch.randn(m, r, device=device), torch.randn(r, n, device=device), backend=name)
        assert torch.equal(W, W0)


def test_parameter_is_updated_without_autograd(backend):
    name, device = backend
    lin = torch.nn.Linear(16, 8, bias=False).to(device)
    B, A = torch.randn(8, 2, device=device), torch.randn(2, 16, device=device)
    expected = lin.weight.detach().clone() + B @ A
    ops.patch_add_(lin.weight, B, A, backend=name)
    torch.testing.assert_close(lin.weight.detach(), expected)
    assert lin.weight.grad_fn is None and lin.weight.requires_grad


def _nan_with_bits(bits: int) -> torch.Tensor:
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_values(backend, dtype):
    """NaN and Inf in W or in the factors come out where the reference has them: a NaN stays a NaN
    whatever its payload bits (fp32 factor NaNs with all low bits set, signalling ones, 0·Inf and
    Inf - Inf), an Inf keeps its sign, and every finite element is as close as in the main test."""
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    m, n, r = 37, 70, 5  # vector blocks plus leftover rows and columns on every CPU path
    W = torch.randn(m, n, generator=gen).to(dtype)
    W[0, 3], W[1, 5], W[2, 7] = float("nan"), float("inf"), float("-inf")
    B = torch.randn(m, r, generator=gen) * 0.1
    A = torch.randn(r, n, generator=gen) * 0.1
    A[1, 10] = _nan_with_bits(0x7FFFFFFF)
    A[2, 20] = _nan_with_bits(0xFFFFFFFF - 2**32)
    A[3, 33] = _nan_with_bits(0x7F80FFFF)  # signalling, payload only in the low bits
    B[5, 0] = _nan_with_bits(0x7FBFFFFF)
    B[6, 4], A[4, 50] = float("inf"), 0.0  # row 6: Inf everywhere but column 50 (Inf * 0 = NaN)
    B[7, 0], B[7, 1] = float("inf"), float("inf")
    A[0, 60], A[1, 60] = 1.0, -1.0  # row 7, column 60: Inf - Inf
    W, B, A = W.to(device), B.to(device), A.to(device)
    scale = torch.full((r,), 0.5, device=device)
    ref = reference.patch_add_(W.clone(), B, A, scale).cpu()
    out = ops.patch_add_(W, B, A, 0.5, backend=name).cpu()
    assert ref.isnan().sum() > n and ref.isinf().sum() > n  # the cases above happened
    if name in ("triton", "cuda") and dtype != torch.float32:
        # Known limit of the split fp32 factors (kernels/patch_add.py, MODE_SPLIT, and the CUDA
        # tensor-core kernel's SPLIT instance, csrc/cuda/patch_add_mma.cuh): an Inf factor
        # meets the other factor's low part as well, and Inf·hi + Inf·lo is NaN where hi and lo
        # differ in sign. Rows 6 and 7 (Inf in B) need only be non-finite there.
        assert not out[6:8].isfinite().any()
        out[6:8], ref[6:8] = 0.0, 0.0
    assert torch.equal(out.isnan(), ref.isnan()), f"NaN where the reference has none, or none where it has: {(out.isnan() != ref.isnan()).nonzero().tolist()[:5]}"
    inf = ref.isinf()
    assert torch.equal(out.isinf(), inf) and torch.equal(out[inf], ref[inf])
    fin = ref.isfinite()
    if dtype == torch.float32:
        assert torch.allclose(out[fin], ref[fin], rtol=1e-5, atol=1e-6)
    else:
        assert ulp_distance(out[fin], ref[fin]).max().item() <= 1
