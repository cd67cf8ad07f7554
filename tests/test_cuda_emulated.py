"""csrc/cuda's kernels, run on the CPU emulation of CUDA (csrc/emu/cuda_emu.h, tests/cuda_emu.py), through
the same tests and bounds as on a GPU: each test below is imported from its op's test file and runs
here with the ``backend`` fixture overridden to the emulated CUDA kernels. On a GPU the same tests run
the real kernels (backend ``cuda`` there). Also: the emulation itself catches a missing barrier, a
misaligned vector access and a shuffle without the whole warp."""

import pytest
import torch

import cuda_emu
from portllm.ops import registry
from test_patch_add import (  # noqa: F401 - collected here with the emulated backend
    test_deterministic,
    test_empty_and_rank_zero,
    test_factor_sharing_memory_with_W,
    test_fp32_factors_on_16bit_W,
    test_matches_reference,
    test_mixed_factor_dtypes,
    test_non_finite_values,
    test_per_rank_scale_merges_several_patches,
    test_several_patches_on_16bit_W_with_16bit_factors,
)
from test_pmss_ops import test_skeleton_mm_matches_reference, test_skeleton_mm_strided_W  # noqa: F401
from test_serve_ops import test_expand, test_shrink  # noqa: F401


def _runs(emu):
    return {"patch_add_": lambda W, B, A, s: emu.patch_add_(W, B, A, s),
            "lora_shrink": lambda x, A, slots, tiles=None: emu.lora_shrink(x, A, slots),
            "lora_expand_": lambda y, h, B, scale, slots, tiles=None: emu.lora_expand_(y, h, B, scale, slots),
            "skeleton_mm": lambda A, W, idx, kind: emu.skeleton_mm(A, W, idx, kind)}


@pytest.fixture
def backend(monkeypatch):
    """Backend ``cuda`` on CPU tensors: csrc/cuda's launchers and kernels, emulated."""
    runs = _runs(cuda_emu.ops())
    for op, run in runs.items():
        monkeypatch.setitem(registry.IMPLEMENTATIONS[op], "cuda",
                            registry.Impl("cuda", f"csrc/cuda (emulated on the CPU): {op}", ("cpu",), run))
    real = registry._unavailable

    def unavailable(op, impl, device):
        if impl.backend == "cuda" and device.type == "cpu":
            return None if op in runs else f"{op} has no emulated CUDA kernel"
        return real(op, impl, device)

    monkeypatch.setattr(registry, "_unavailable", unavailable)
    return "cuda", torch.device("cpu")


def test_emulation_catches_a_missing_barrier():
    emu = cuda_emu.ops()
    x = torch.arange(256, dtype=torch.float32)
    assert torch.equal(emu.selftest_reverse(x, True), x.flip(0))
    assert not torch.equal(emu.selftest_reverse(x, False), x.flip(0))


def test_emulation_checks_vector_alignment_and_whole_warp_shuffles():
    emu = cuda_emu.ops()
    x = torch.arange(64, dtype=torch.float32)
    assert torch.equal(emu.selftest_vector_copy(x, 0), x[:32])
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        emu.selftest_vector_copy(x, 1)
    with pytest.raises(RuntimeError, match="without all 32 lanes"):
        emu.selftest_partial_shuffle(x)


# The launcher's layouts that the shared tests' odd shapes do not reach: factors used as they are
# (contiguous, ranks and columns multiples of 8, groups starting on multiples of 8), W rows that
# are not 16-byte aligned (the scalar-epilogue instances), and the fallback kernel's 16-byte path
# for a 16-bit W (more than 16 scale groups) and for an fp32 W.
LAYOUT_CASES = {
    "factors as they are, one scale": (torch.bfloat16, torch.bfloat16, [0.37] * 32, 0),
    "factors as they are, groups on multiples of 8": (torch.bfloat16, torch.bfloat16, [0.5] * 8 + [-2.0] * 16 + [3.0] * 8, 0),
    "fp16 factors, groups off multiples of 8 (copied)": (torch.float16, torch.float16, [0.5] * 5 + [-2.0] * 20 + [3.0] * 7, 0),
    "fp32 factors, split": (torch.bfloat16, torch.float32, [0.37] * 32, 0),
    "W rows not 16-byte aligned": (torch.bfloat16, torch.bfloat16, [0.37] * 32, 1),
    "fallback, 32 scale groups": (torch.bfloat16, torch.bfloat16, [0.01 * (k + 1) for k in range(32)], 0),
    "fallback, fp32 W": (torch.float32, torch.float32, [0.37] * 32, 0),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_launcher_layouts(case):
    from test_patch_add import check_against_reference

    from portllm import reference

    dtype_w, dtype_f, scales, offset = LAYOUT_CASES[case]
    if dtype_w == torch.bfloat16 and dtype_f == torch.float16:
        dtype_w = torch.float16
    emu = cuda_emu.ops()
    gen = torch.Generator().manual_seed(len(case))
    m, n, r = 72, 264, len(scales)
    big = torch.randn(m, n + 8, generator=gen).to(dtype_w)
    W = big[:, offset:offset + n]
    B = (torch.randn(m, r, generator=gen) * 0.1).to(dtype_f)
    A = (torch.randn(r, n, generator=gen) * 0.1).to(dtype_f)
    s = torch.tensor(scales, dtype=torch.float32)
    big0, W0 = big.clone(), W.clone()
    ref = reference.patch_add_(W0.clone(), B, A, s)
    emu.patch_add_(W, B, A, s)
    check_against_reference(W.clone(), W0, B, A, s, ref)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[:, offset:offset + n] = False
    assert torch.equal(big[outside], big0[outside])  # nothing written outside W


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["serve", "unaligned"])
def test_serving_vector_layouts(dtype, layout):
    """The serving kernels' 16-byte instances: x, A and y rows with unit stride, sizes multiples of 8,
    B in portllm.serve's slot layout (stored [P, R, m], viewed [P, m, R]); and the same tensors one
    element off 16-byte alignment (the element-wise instances). Tokens of one slot next to each other
    and apart, and tokens without a patch, in tiles of the kernels' four tokens."""
    from test_serve_ops import shrink_bound

    emu = cuda_emu.ops()
    gen = torch.Generator().manual_seed(3)
    T, n, m, P, R = 11, 264, 136, 3, 16
    off = 1 if layout == "unaligned" else 0
    x = torch.randn(T, n + 8, generator=gen).to(dtype)[:, off:off + n]
    A = torch.randn(P, R, n + 8, generator=gen).to(dtype)[:, :, off:off + n]
    slots = torch.tensor([0, 0, 0, 1, 2, -1, 2, 1, 1, 1, 0])
    h = emu.lora_shrink(x, A, slots)
    exact = torch.zeros(T, R, dtype=torch.float64)
    for t, p in enumerate(slots.tolist()):
        if p >= 0:
            exact[t] = A[p].double() @ x[t].double()
    assert ((h.double() - exact).abs() <= shrink_bound(x, A, slots)).all()
    assert (h[slots < 0] == 0).all()

    y0 = torch.randn(T, m + 8, generator=gen).to(dtype)
    y = y0.clone()
    hv = torch.randn(T, R, generator=gen)
    B = (torch.randn(P, R, m + 8, generator=gen) * 0.2).to(dtype)[:, :, off:off + m].transpose(1, 2)
    scale = torch.rand(P, generator=gen) + 0.5
    emu.lora_expand_(y[:, off:off + m], hv, B, scale, slots)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for t, p in enumerate(slots.tolist()):
        cols = slice(off, off + m)
        if p >= 0:
            exact = y0[t, cols].double() + float(scale[p]) * (B[p].double() @ hv[t].double())
            mag = y0[t, cols].double().abs() + float(scale[p]) * (B[p].double().abs() @ hv[t].double().abs())
            bound = 2 * (R + 3) * 2.0**-24 * mag + exact.abs() * torch.finfo(dtype).eps  # fp32 sum, one rounding
            assert ((y[t, cols].double() - exact).abs() <= bound).all(), f"token {t}, slot {p}"
        else:
            assert torch.equal(y[t, cols].view(bits), y0[t, cols].view(bits)), f"token {t} has no patch but changed"
        rest = torch.ones(m + 8, dtype=torch.bool)
        rest[cols] = False
        assert torch.equal(y[t, rest].view(bits), y0[t, rest].view(bits)), f"token {t}: written outside y's columns"
