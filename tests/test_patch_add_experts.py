"""patch_add_experts_ on every backend: each expert exactly patch_add_ on its 2-D view (the same bits), and
so within patch_add_'s bound of the exact result; odd shapes, a transposed [E, in, out] layout, per-expert
scales, errors named."""

import pytest
import torch

from helpers import DTYPES
from portllm import ops
from test_patch_add import check_against_reference

# (E, m, n, r)
SHAPES = [(1, 1, 1, 1), (3, 5, 123, 7), (5, 33, 17, 16), (2, 70, 300, 33)]


def _case(E, m, n, r, dtype, device, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:  # stored [E, n, m] (GPT-OSS's [experts, in, out]) and merged as its transpose
        W = torch.randn(E, n, m, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    else:
        W = torch.randn(E, m, n, generator=g).to(device=device, dtype=dtype)
    B = (torch.randn(E, m, r, generator=g) * 0.1).to(device=device, dtype=dtype)
    A = (torch.randn(E, r, n, generator=g) * 0.1).to(device=device, dtype=dtype)
    s = (torch.rand(E, r, generator=g) + 0.5).to(device)
    return W, B, A, s


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["EMN", "ENM-transposed"])
def test_each_expert_is_patch_add(backend, shape, dtype, transposed):
    name, device = backend
    E, m, n, r = shape
    W, B, A, s = _case(E, m, n, r, dtype, device, seed=sum(shape), transposed=transposed)
    W0 = W.clone()
    per_expert = W.clone()
    for e in range(E):
        ops.patch_add_(per_expert[e], B[e], A[e], s[e], backend=name)
    out = ops.patch_add_experts_(W, B, A, s, backend=name)
    assert out is W
    assert torch.equal(W, per_expert)  # the same bits as patch_add_ on each expert's view
    for e in range(E):
        ref = W0[e].clone()
        ops.patch_add_(ref, B[e], A[e], s[e], backend="reference")
        check_against_reference(W[e].cpu(), W0[e].cpu(), B[e].cpu(), A[e].cpu(), s[e].cpu(), ref.cpu())


def test_scale_forms_and_errors():
    W, B, A, _ = _case(3, 4, 6, 2, torch.float32, "cpu", seed=1)
    a, b, c = W.clone(), W.clone(), W.clone()
    ops.patch_add_experts_(a, B, A, 0.5)
    ops.patch_add_experts_(b, B, A, torch.full((2,), 0.5))
    ops.patch_add_experts_(c, B, A, torch.full((3, 2), 0.5))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, W)
    with pytest.raises(ValueError, match=r"shapes do not match: W \(3, 4, 6\), B \(2, 4, 2\)"):
        ops.patch_add_experts_(W, B[:2], A)
    with pytest.raises(ValueError, match=r"scale must be a number, \[2\] or \[3, 2\]"):
        ops.patch_add_experts_(W, B, A, torch.ones(4))
    with pytest.raises(ValueError, match="must be 3-D"):
        ops.patch_add_experts_(W[0], B[0], A[0])
    with pytest.raises(ValueError, match="share memory"):
        ops.patch_add_experts_(W[:1].expand(3, 4, 6), B, A)
    B[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="B .* NaN"):
        ops.patch_add_experts_(W, B, A, check_finite=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_runs_that_differ_between_experts(backend, dtype):
    """Per-expert scales whose runs of equal values differ from expert to expert (the Triton kernel
    groups ranks by the runs shared by every expert): each expert within patch_add_'s bound."""
    name, device = backend
    W, B, A, _ = _case(3, 37, 150, 6, dtype, device, seed=4)
    s = torch.tensor([[1.0, 1.0, 2.0, 2.0, 2.0, 0.5], [3.0] * 6, [0.25, 0.5, 0.5, 0.5, 0.5, 0.5]], device=device)
    W0 = W.clone()
    ops.patch_add_experts_(W, B, A, s, backend=name)
    for e in range(3):
        ref = W0[e].clone()
        ops.patch_add_(ref, B[e], A[e], s[e], backend="reference")
        check_against_reference(W[e].cpu(), W0[e].cpu(), B[e].cpu(), A[e].cpu(), s[e].cpu(), ref.cpu())


def test_merge_experts_into_is_all_or_nothing():
    """A fused fp16 weight where expert 2's update would overflow: the merge is refused naming that
    expert, and no expert of W changed (the bound cannot clear it, so each expert is checked first)."""
    from portllm.merge import NonFiniteMergeError, merge_experts_into
    from portllm.patch import PatchModule

    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 8, 6, generator=g).half()
    per_expert = {}
    for e in range(4):
        B, A = torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g)
        per_expert[e] = [(PatchModule(B * (1e5 if e == 2 else 0.1), A, 1.0), 1.0)]
    W0 = W.clone()
    with pytest.raises(NonFiniteMergeError, match=r"w\[2\]"):
        merge_experts_into(W, per_expert, name="w")
    assert torch.equal(W, W0)


def test_merge_experts_into_names_experts_from_first_and_merges_past_a_nan():
    """A slice of a fused weight (experts 5.. of the tensor, as a port's chunk): a refusal names the
    tensor's own expert index; a weight already holding a NaN (the bound cannot clear it) is merged
    expert by expert, each expert as patch_add_ merges it, the NaN left as it was."""
    from portllm.merge import NonFiniteMergeError, merge_experts_into
    from portllm.patch import PatchModule

    g = torch.Generator().manual_seed(1)
    W = torch.randn(3, 8, 6, generator=g).half()
    mods = {e: PatchModule(torch.randn(8, 2, generator=g) * (1e5 if e == 1 else 0.1), torch.randn(2, 6, generator=g),
                           1.0) for e in range(3)}
    with pytest.raises(NonFiniteMergeError, match=r"w\[6\]"):
        merge_experts_into(W.clone(), {e: [(m, 1.0)] for e, m in mods.items()}, name="w", first=5)
    W[0, 3, 2] = float("nan")
    ok = {e: [(mods[e], 1.0)] for e in (0, 2)}  # expert 1 unpatched: not every expert alike either
    want = W.clone()
    for e in (0, 2):
        ops.patch_add_(want[e], mods[e].B, mods[e].A, 1.0)
    got = merge_experts_into(W.clone(), ok, name="w", first=5)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
