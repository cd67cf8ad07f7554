"""The Triton fp8_merge kernel (kernels/fp8_merge.py) against the reference, every output bit: odd shapes
and blocks, both roundings, factor dtypes, blocks with zeros, a NaN, subnormals and ties; under
TRITON_INTERPRET=1 on CPU (conftest), on the GPU where there is one."""

import pytest
import torch

from portllm import fp8, ops

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402

from portllm.kernels.fp8_merge import _e4m3_code, _e4m3_value  # noqa: E402

pytestmark = pytest.mark.skipif(ops.backend_unavailable_reason("triton", "cuda" if torch.cuda.is_available() else "cpu",
                                                               "fp8_merge") is not None,
                                reason="the Triton backend cannot run here")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(M, N, block, r, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g) * 0.02
    W[0, : min(N, 6)] = torch.tensor([1e-6, -1e-7, 0.0, -0.0, 3e-3, 2.0 ** -12])[: min(N, 6)]  # subnormal codes
    q, s = fp8.quantize(W, block)
    B = (torch.randn(M, r, generator=g) * 0.01).to(dtype)
    A = (torch.randn(r, N, generator=g) * 0.01).to(dtype)
    return q, s, B, A, torch.rand(r, generator=g) + 0.5


def _codes(t):
    return t.view(torch.uint8).cpu()


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("M,N,block,r", [(130, 70, (64, 32), 3), (5, 7, (128, 128), 2), (256, 384, (128, 128), 16),
                                         (97, 200, (16, 64), 1), (64, 300, (128, 128), 8)])
def test_triton_equals_reference_bit_for_bit(M, N, block, r, stochastic):
    q, s, B, A, sc = _case(M, N, block, r, seed=M + N)
    key = fp8.stream_key(11)
    ref = ops.fp8_merge(q, s, B, A, sc, block, stochastic=stochastic, key=key, backend="reference")
    poison_q = torch.full_like(q.view(torch.uint8), 0x7F)
    out = ops.fp8_merge(q.to(DEV), s.to(DEV), B.to(DEV), A.to(DEV), sc.to(DEV), block, stochastic=stochastic,
                        key=key, backend="triton")
    assert not torch.equal(_codes(out[0]), poison_q)
    assert torch.equal(_codes(out[0]), _codes(ref[0]))
    assert torch.equal(out[1].cpu(), ref[1])
    assert torch.allclose(out[2].cpu(), ref[2], rtol=1e-9, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_factors(dtype):
    q, s, B, A, sc = _case(128, 256, (128, 128), 8, seed=3, dtype=dtype)
    ref = ops.fp8_merge(q, s, B, A, sc, (128, 128), backend="reference")
    out = ops.fp8_merge(q.to(DEV), s.to(DEV), B.to(DEV), A.to(DEV), sc.to(DEV), (128, 128), backend="triton")
    assert torch.equal(_codes(out[0]), _codes(ref[0])) and torch.equal(out[1].cpu(), ref[1])


def test_zero_nan_and_tiny_blocks():
    """A block of zeros keeps scale 1; a block holding a NaN keeps scale 1 and NaN codes where the
    reference has them (the sign of a NaN made by arithmetic is the hardware's); a tiny amax gives an
    infinite scale on both."""
    q, s, B, A, sc = _case(64, 96, (32, 32), 2, seed=5)
    qd = q.clone()
    qd[:32, :32] = 0  # W zero there, and B zero on those rows: a block of zeros
    B = B.clone()
    B[:32] = 0
    s = s.clone()
    s[1, 1] = float("nan")  # a NaN block (the op does not check scales; the port does)
    s[1, 2] = 1e-38  # tiny
    ref = ops.fp8_merge(qd, s, B, A, sc, (32, 32), backend="reference")
    out = ops.fp8_merge(qd.to(DEV), s.to(DEV), B.to(DEV), A.to(DEV), sc.to(DEV), (32, 32), backend="triton")
    rq, oq = _codes(ref[0]), _codes(out[0])
    assert torch.equal(rq & 0x7F == 0x7F, oq & 0x7F == 0x7F)  # NaN where the reference has NaN
    fin = rq & 0x7F != 0x7F
    assert torch.equal(rq[fin], oq[fin])
    assert torch.equal(out[1].cpu().nan_to_num(), ref[1].nan_to_num()) and float(ref[1][0, 0]) == 1.0


def test_port_with_triton_backend(tmp_path):
    """The port into block-FP8 on the Triton backend writes the reference backend's bytes."""
    from safetensors.torch import load_file
    from test_fp8 import _fp8_checkpoint, _patch

    import portllm

    _fp8_checkpoint(tmp_path / "m")
    for backend in ("reference", "triton"):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / backend), rounding="stochastic", seed=2,
                     backend=backend, device=DEV, progress=False, log=None)
    a, b = load_file(str(tmp_path / "reference" / "model.safetensors")), load_file(
        str(tmp_path / "triton" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


@triton.jit
def _rounding_kernel(X, U, OUT, VAL, n, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    """The merge kernel's rounding helpers, element by element."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0)
    u = tl.load(U + offs, mask=m, other=0)
    tl.store(OUT + offs, _e4m3_code(x, u, STOCHASTIC), mask=m)
    tl.store(VAL + offs, _e4m3_value(offs & 0xFF), mask=m)


def _rounding_inputs():
    """Every e4m3 value, every midpoint between neighbours (ties, subnormal ones included), points just
    either side of them, and random values over the whole range, both signs, clamped to ±448."""
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals) & (vals >= 0)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([torch.nextafter(mids, torch.full_like(mids, 0)), torch.nextafter(mids, torch.full_like(mids, 1e9))])
    g = torch.Generator().manual_seed(0)
    rnd = torch.cat([torch.rand(4000, generator=g) * 448, torch.rand(4000, generator=g) * 2.0 ** -6,
                     torch.exp2(torch.rand(4000, generator=g) * 26 - 18)])
    x = torch.cat([vals, mids, near, rnd]).clamp(max=448)
    return torch.cat([x, -x, torch.tensor([float("nan")])])


def test_e4m3_codes_and_values_in_integer_arithmetic():
    """The kernel's rounding helpers on their own: nearest even is torch's conversion, bit for bit, on
    every tie; stochastic is fp8.round_e4m3's for the same random bits; every code decodes exactly."""
    codes = _rounding_kernel
    x = _rounding_inputs().to(DEV)
    n = x.numel()
    idx = torch.arange(n, dtype=torch.int64)
    key = fp8.stream_key(3)
    u = fp8.random_bits(idx, key).to(DEV)
    for stochastic in (False, True):
        out = torch.full((n,), -1, dtype=torch.int32, device=DEV)
        val = torch.empty(n, dtype=torch.float32, device=DEV)
        codes[(-(-n // 1024),)](x, u, out, val, n, STOCHASTIC=stochastic, BLOCK=1024)
        want = fp8.round_e4m3(x.cpu(), "stochastic" if stochastic else "nearest", key=key, index=idx)
        want = want.view(torch.uint8).to(torch.int32)
        got = out.cpu()
        fin = (want & 0x7F) != 0x7F
        assert torch.equal(got[fin], want[fin])
        assert bool(((got[~fin] & 0x7F) == 0x7F).all())
    allc = torch.arange(n, dtype=torch.int64) & 0xFF
    ref = allc.to(torch.uint8).view(torch.float8_e4m3fn).float()
    v = val.cpu()
    assert torch.equal(torch.isnan(v), torch.isnan(ref)) and torch.equal(v[~torch.isnan(ref)], ref[~torch.isnan(ref)])


def test_triton_custom_op_passes_opcheck():
    q, s, B, A, sc = _case(40, 48, (16, 32), 2, seed=9)
    Bs = (B * sc[None, :]).contiguous()
    args = (q.view(torch.uint8).to(DEV), s.to(DEV), Bs.to(DEV), A.to(DEV), 16, 32, True, -12345)
    torch.library.opcheck(torch.ops.portllm.fp8_merge_triton, args)


def test_a_scale_of_the_wrong_shape_is_refused_on_every_backend():
    q, s, B, A, sc = _case(256, 64, (128, 64), 2, seed=1)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"scale_inv has shape \(1, 1\); a 256x64 weight in blocks of 128x64 has \[2, 1\]"):
            ops.fp8_merge(q.to(DEV), s[:1].to(DEV), B.to(DEV), A.to(DEV), sc.to(DEV), (128, 64), backend=backend)
