"""patch_add_ refuses bad input with a message that names the thing at fault, and leaves W alone."""

import re

import pytest
import torch

from portllm import BackendUnavailableError, ops


def args(m=6, n=5, r=3, dtype=torch.float32):
    return torch.randn(m, n, dtype=dtype), torch.randn(m, r, dtype=dtype), torch.randn(r, n, dtype=dtype)


@pytest.fixture(params=["reference", "cpp"])
def cpu_backend(request):
    reason = ops.backend_unavailable_reason(request.param, "cpu")
    if reason:
        pytest.skip(reason)
    return request.param


def test_shape_mismatch_names_both_shapes(cpu_backend):
    W, B, A = args()
    with pytest.raises(ValueError, match=re.escape("W (6, 5), B (6, 3), A (3, 4)")):
        ops.patch_add_(W, B, A[:, :4], backend=cpu_backend)
    with pytest.raises(ValueError, match=re.escape("B (6, 2), A (3, 5)")):
        ops.patch_add_(W, B[:, :2], A, backend=cpu_backend)


@pytest.mark.parametrize("which", ["W", "B", "A"])
def test_not_2d(which, cpu_backend):
    t = dict(zip("WBA", args()))
    t[which] = t[which].reshape(-1)
    with pytest.raises(ValueError, match=f"{which} must be 2-D, got shape"):
        ops.patch_add_(t["W"], t["B"], t["A"], backend=cpu_backend)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float64, torch.bool])
def test_unsupported_dtypes(dtype, cpu_backend):
    W, B, A = args()
    with pytest.raises(TypeError, match=f"W has dtype {dtype}"):
        ops.patch_add_(W.to(dtype), B, A, backend=cpu_backend)
    with pytest.raises(TypeError, match=f"A has dtype {dtype}"):
        ops.patch_add_(W, B, A.to(dtype), backend=cpu_backend)


def test_mixed_devices(cpu_backend):
    W, B, A = args()
    with pytest.raises(ValueError, match="B is on meta but W is on cpu"):
        ops.patch_add_(W, B.to("meta"), A, backend=cpu_backend)


def test_bad_scale(cpu_backend):
    W, B, A = args()
    with pytest.raises(ValueError, match=re.escape("scale must be a number or have shape (3,)")):
        ops.patch_add_(W, B, A, torch.ones(4), backend=cpu_backend)
    with pytest.raises(TypeError, match="scale must be a number or a tensor"):
        ops.patch_add_(W, B, A, "0.5", backend=cpu_backend)
    with pytest.raises(TypeError, match="scale has dtype torch.int64"):
        ops.patch_add_(W, B, A, torch.ones(3, dtype=torch.long), backend=cpu_backend)


def test_expanded_W_refused(cpu_backend):
    _, B, A = args()
    W = torch.zeros(1, 5).expand(6, 5)
    with pytest.raises(ValueError, match="share memory"):
        ops.patch_add_(W, B, A, backend=cpu_backend)


def test_nan_check_is_opt_in(cpu_backend, monkeypatch):
    W, B, A = args()
    A[1, 2] = float("nan")
    B[0, 0] = float("inf")
    W0 = W.clone()
    with pytest.raises(ValueError, match=r"B \(6, 3\) has 1 NaN or Inf"):
        ops.patch_add_(W, B, A, check_finite=True, backend=cpu_backend)
    assert torch.equal(W, W0), "a refused patch must not touch W"
    with pytest.raises(ValueError, match=r"scale \(3,\) has 1 NaN or Inf"):
        ops.patch_add_(W, B.nan_to_num(), A.nan_to_num(), torch.tensor([1.0, float("nan"), 1.0]),
                       check_finite=True, backend=cpu_backend)
    monkeypatch.setenv("PORTLLM_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match=r"A \(3, 5\) has 1 NaN or Inf"):
        ops.patch_add_(W, B.nan_to_num(), A, backend=cpu_backend)
    monkeypatch.delenv("PORTLLM_CHECK_FINITE")
    ops.patch_add_(W, B, A, backend=cpu_backend)  # off by default: merged as given
    assert W.isnan().any()


def test_factors_requiring_grad_refused(cpu_backend):
    W, B, A = args()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.patch_add_(W, B.requires_grad_(), A, backend=cpu_backend)
    with torch.no_grad():
        ops.patch_add_(W, B, A, backend=cpu_backend)


def test_unknown_backend():
    W, B, A = args()
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of reference, cpp, cuda, triton"):
        ops.patch_add_(W, B, A, backend="fast")


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    W, B, A = args()
    with pytest.raises(BackendUnavailableError, match="'cuda' runs on CUDA tensors, the tensors are on cpu"):
        ops.patch_add_(W, B, A, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        ops.patch_add_(W, B, A, backend="triton")
    monkeypatch.setenv("PORTLLM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
        ops.patch_add_(W, B, A)


def test_env_selects_backend(monkeypatch):
    calls = []
    real = ops.reference.patch_add_
    monkeypatch.setattr(ops.reference, "patch_add_", lambda *a: calls.append(1) or real(*a))
    W, B, A = args()
    monkeypatch.setenv("PORTLLM_BACKEND", "reference")
    ops.patch_add_(W, B, A)
    assert calls == [1]
    assert ops.resolve_backend("auto", "cpu") == ops.available_backends("cpu")[0]


def test_default_cpu_backend_is_cpp_when_built():
    if ops.backend_unavailable_reason("cpp", "cpu"):
        assert ops.available_backends("cpu")[0] == "reference"
    else:
        assert ops.available_backends("cpu")[0] == "cpp"
