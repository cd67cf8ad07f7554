"""patch_add_ as a torch.library op: opcheck, torch.compile, and life without the extension."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from portllm import ops

OPS = {"cpp": "patch_add_", "cuda": "patch_add_", "triton": "patch_add_triton_"}


def _op_args(device, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(37, 70, generator=gen).to(device=device, dtype=dtype)
    B = torch.randn(37, 5, generator=gen).to(device=device, dtype=dtype)
    A = torch.randn(5, 70, generator=gen).to(device=device, dtype=dtype)
    s = torch.rand(5, generator=gen).to(device)
    return W, B, A, s


def test_opcheck(backend):
    name, device = backend
    if name not in OPS:
        pytest.skip("the reference backend is plain torch, not a custom op")
    op = getattr(torch.ops.portllm, OPS[name]).default
    torch.library.opcheck(op, _op_args(device))


def test_torch_compile(backend):
    name, device = backend
    torch._dynamo.reset()

    def merge(W, B, A, s):
        ops.patch_add_(W, B, A, s, backend=name)
        return W * 2

    W, B, A, s = _op_args(device)
    W_eager = W.clone()
    expected = merge(W_eager, B, A, s)
    compiled = torch.compile(merge, backend="aot_eager" if name == "triton" else "inductor")
    out = compiled(W, B, A, s)
    assert torch.equal(W, W_eager), "the compiled op must update W in place, like eager"
    assert torch.equal(out, expected)


def test_works_without_extension():
    """If portllm._C cannot be loaded, portllm warns once and runs on the reference backend."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["portllm._C"] = None  # makes `from portllm import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import portllm
            import portllm.ops as ops
        msgs = [str(w.message) for w in caught if "portllm._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert ops.available_backends("cpu") == ["reference"] or "triton" in ops.available_backends("cpu")
        import torch
        W = torch.zeros(3, 4); B = torch.ones(3, 2); A = torch.ones(2, 4)
        portllm.patch_add_(W, B, A, 0.5)
        assert torch.equal(W, torch.ones(3, 4)), W
        try:
            portllm.patch_add_(W, B, A, backend="cpp")
        except portllm.BackendUnavailableError as e:
            assert "portllm._C is not loaded" in str(e), e
        else:
            raise AssertionError("cpp backend should be unavailable")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PORTLLM_BACKEND", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
