"""PMSS skeleton GEMMs and the PMSS linear function: every backend against the reference and the
dense formula, outputs and gradients."""

import pytest
import torch

from portllm import ops, reference
from portllm.pmss import PMSSLinear, pmss_linear, select_skeleton

# dtype: (atol, rtol) for outputs and gradients against an fp32 computation of the same inputs
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2)}
SHAPES = [(1, 1, 1), (5, 123, 3), (37, 29, 29), (130, 70, 16)]  # (m, n, r), r up to min(m, n)


def _idx(size, r, gen):
    return torch.randperm(size, generator=gen)[:r].sort().values


@pytest.mark.parametrize("kind", ["ct", "c", "r"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,r", SHAPES, ids=str)
def test_skeleton_mm_matches_reference(backend, kind, dtype, m, n, r):
    name, device = backend
    gen = torch.Generator().manual_seed(m + n + r)
    W = torch.randn(m, n, generator=gen)
    idx = _idx(n if kind in ("ct", "c") else m, r, gen)
    K = {"ct": r, "c": m, "r": r}[kind]
    A = torch.randn(9, K, generator=gen)
    expected = reference.skeleton_mm(A.double(), W.double(), idx, kind)
    out = ops.skeleton_mm(A.to(device, dtype), W.to(device, dtype), idx.to(device), kind, backend=name)
    assert out.dtype == dtype and out.shape == expected.shape
    # Error of the same product computed by torch in this dtype, as flash-attention's tests do.
    torch_lowp = reference.skeleton_mm(A.to(dtype), W.to(dtype), idx, kind).double()
    err, err_torch = (out.double().cpu() - expected).abs().max(), (torch_lowp - expected).abs().max()
    assert err <= 2 * err_torch + 1e-6 * expected.abs().max(), f"{err} vs torch's {err_torch}"


def test_skeleton_mm_strided_W(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(50, 90, generator=gen).to(device)
    W = big[5:45, 10:70]  # a slice: row stride 90
    idx = _idx(60, 6, gen).to(device)
    A = torch.randn(7, 6, generator=gen).to(device)
    torch.testing.assert_close(ops.skeleton_mm(A, W, idx, "ct", backend=name).cpu(),
                               reference.skeleton_mm(A, W, idx, "ct").cpu(), rtol=1e-5, atol=1e-5)


def dense_pmss(x, W, bias, I, J, U, s):
    """The dense formula: y = x (W + s C U R)ᵀ + bias."""
    dW = s * W[:, J] @ U @ W[I, :]
    y = x @ (W + dW).t()
    return y + bias if bias is not None else y


@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_fp64_against_dense(with_bias):
    gen = torch.Generator().manual_seed(1)
    m, n, r = 11, 9, 4
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    I, J = _idx(m, r, gen), _idx(n, r, gen)
    U = torch.randn(r, r, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(m, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    x = torch.randn(2, 3, n, generator=gen, dtype=torch.float64, requires_grad=True)
    f = lambda x, U, bias: pmss_linear(x, W, bias, I, J, U, 0.7)  # noqa: E731
    inputs = (x, U, bias)
    assert torch.autograd.gradcheck(f, inputs)
    y = f(*inputs)
    y_dense = dense_pmss(x, W, bias, I, J, U, 0.7)
    torch.testing.assert_close(y, y_dense)
    go = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in inputs if t is not None], go)
    exp = torch.autograd.grad(y_dense, [t for t in inputs if t is not None], go)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,r", [(33, 47, 5), (64, 64, 64), (17, 100, 1)], ids=str)
def test_layer_backends_forward_backward(backend, dtype, m, n, r):
    name, device = backend
    gen = torch.Generator().manual_seed(m * n + r)
    lin = torch.nn.Linear(n, m).to(device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(m, n, generator=gen))
        lin.bias.copy_(torch.randn(m, generator=gen))
    I, J = select_skeleton(lin.weight, r, "qdeim")
    layer = PMSSLinear(lin, I, J, scale=0.5, backend=name)
    with torch.no_grad():
        layer.U.copy_(torch.randn(r, r, generator=gen) * 0.1)
    x = torch.randn(3, 5, n, generator=gen).to(device, dtype).requires_grad_()
    y = layer(x)
    go = torch.randn(y.shape, generator=gen).to(device, dtype)
    dx, dU = torch.autograd.grad(y, [x, layer.U], go)
    # fp32 dense reference on the same (rounded) inputs
    W32, b32, x32, U32 = lin.weight.float(), lin.bias.float(), x.detach().float().requires_grad_(), layer.U.detach().clone().requires_grad_()
    y32 = dense_pmss(x32, W32, b32, layer.I, layer.J, U32, 0.5)
    dx32, dU32 = torch.autograd.grad(y32, [x32, U32], go.float())
    atol, rtol = TOL[dtype]
    scale_y, scale_dU = y32.abs().max().item(), dU32.abs().max().item()
    torch.testing.assert_close(y.float(), y32, atol=atol * scale_y, rtol=rtol)
    torch.testing.assert_close(dx.float(), dx32, atol=atol * dx32.abs().max().item(), rtol=rtol)
    torch.testing.assert_close(dU.float(), dU32, atol=atol * scale_dU, rtol=rtol)
    assert dU.dtype == torch.float32  # U is kept in fp32, whatever the model's dtype


def test_saves_only_h_for_backward():
    """Activations saved beyond the base layer's: h (tokens × r), nothing of size tokens × n or m."""
    lin = torch.nn.Linear(64, 48)
    I, J = select_skeleton(lin.weight, 8)
    layer = PMSSLinear(lin, I, J)
    x = torch.randn(100, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t.data_ptr() not in {lin.weight.data_ptr(), layer.U.data_ptr(),
                                                            layer.I.data_ptr(), layer.J.data_ptr()}]
    assert [tuple(t.shape) for t in activations] == [(100, 8)]


@pytest.mark.parametrize("kind", ["ct", "c", "r"])
def test_skeleton_mm_opcheck(backend, kind):
    name, device = backend
    op = {"cpp": "skeleton_mm", "cuda": "skeleton_mm", "triton": "skeleton_mm_triton"}.get(name)
    if op is None:
        pytest.skip("the reference backend is plain torch, not a custom op")
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(20, 30, generator=gen).to(device)
    idx = _idx(30 if kind != "r" else 20, 5, gen).to(device)
    A = torch.randn(7, {"ct": 5, "c": 20, "r": 5}[kind], generator=gen).to(device)
    torch.library.opcheck(getattr(torch.ops.portllm, op).default, (A, W, idx, kind))


def test_skeleton_mm_errors():
    W, idx = torch.randn(20, 30), torch.tensor([1, 4, 7])
    with pytest.raises(ValueError, match=r"A \(7, 4\) needs 3 columns for W \(20, 30\)"):
        ops.skeleton_mm(torch.randn(7, 4), W, idx, "ct")
    with pytest.raises(TypeError, match="idx must be a 1-D int64/int32 tensor"):
        ops.skeleton_mm(torch.randn(7, 3), W, idx.float(), "ct")
    with pytest.raises(ValueError, match="unknown kind 'x'"):
        ops.skeleton_mm(torch.randn(7, 3), W, idx, "x")
    with pytest.raises(ops.BackendUnavailableError):
        ops.skeleton_mm(torch.randn(7, 3).double(), W.double(), idx, "ct", backend="cuda")
