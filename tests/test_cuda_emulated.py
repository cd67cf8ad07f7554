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
