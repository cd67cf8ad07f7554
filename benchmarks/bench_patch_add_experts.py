"""patch_add_experts_ (W[e] += B[e]·diag(s)·A[e] for every expert of a fused [E, m, n] weight), bf16, r=16, in
one run: the batched op (``portllm-<backend>``: one call per tensor), a loop of ``patch_add_`` calls per
expert (``portllm-<backend> per expert``), and the passes over the same bytes (a copy, ``W.mul_(1)``,
``W.view(int16).add_(0)``), the fastest of which is the limit (``limit_pass``). Shapes: Qwen3-30B-A3B's 128
experts of 768x2048 and Mixtral's 8 experts of 14336x4096 (940 MB).
"""

import pytest
import torch
from bench_patch_add import BACKENDS, DTYPE, PASSES, SCALE, provider_fn, run
from benchutil import DEVICE, QUICK
from suite import Suite, fmt

from portllm import ops

# Mixture-of-experts weights: Qwen3-30B-A3B's 128 experts of 768x2048 and Mixtral's 8 experts of 14336x4096.
EXPERT_SHAPES = [(4, 96, 256)] if QUICK else [(128, 768, 2048), (8, 14336, 4096)]
EXPERT_PROVIDERS = [*PASSES] + [f"portllm-{b}" for b in BACKENDS] + [f"portllm-{b} per expert" for b in BACKENDS]


@pytest.mark.parametrize("shape", EXPERT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", EXPERT_PROVIDERS)
def test_patch_add_experts(benchmark, shape, provider):
    """patch_add_experts_ (one call per tensor) on a fused [E, m, n] bf16 weight, r=16, against a loop of
    patch_add_ calls per expert and the passes over the same bytes."""
    E, m, n = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    W = torch.randn(E, m, n, generator=g, device=DEVICE, dtype=DTYPE)
    B = (torch.randn(E, m, 16, generator=g, device=DEVICE) * 0.01).to(DTYPE)
    A = (torch.randn(E, 16, n, generator=g, device=DEVICE) * 0.01).to(DTYPE)
    f_bytes = (B.numel() + A.numel()) * 2
    if provider in PASSES:
        fn = provider_fn(provider, W, None, None, None)
    elif provider.endswith("per expert"):
        backend = provider.split()[0].removeprefix("portllm-")

        def fn():
            for e in range(E):
                ops.patch_add_(W[e], B[e], A[e], SCALE, backend=backend)
    else:
        backend = provider.removeprefix("portllm-")

        def fn():
            ops.patch_add_experts_(W, B, A, SCALE, backend=backend)
    info = dict(op="patch_add_experts_", case="experts", E=E, m=m, n=n, r=16, dtype="bfloat16",
                factor_dtype="bfloat16", provider=provider,
                bytes=2 * W.numel() * W.element_size() + (0 if provider in PASSES else f_bytes), factor_bytes=f_bytes)
    run(benchmark, fn, f"experts {E}x{m}x{n} r=16", info)
    del W, B, A


def derive(rows: list[dict]):
    """Each provider's speed as a fraction of the fastest pass over the same expert weights, same run."""
    ex = [r for r in rows if r["op"] == "patch_add_experts_"]
    passes: dict = {}
    for r in ex:
        if r["provider"] in PASSES:
            best = passes.get((r["E"], r["m"], r["n"]))
            if best is None or r["median_ms"] < best["median_ms"]:
                passes[(r["E"], r["m"], r["n"])] = r
    for r in ex:
        p = passes.get((r["E"], r["m"], r["n"]))
        if p is not None:
            r["fraction_of_fastest_pass"] = round(p["median_ms"] / r["median_ms"], 3)
            r["limit_pass"] = p["provider"]


def table(rows: list[dict]) -> list[str]:
    out = []
    ex = [r for r in rows if r["op"] == "patch_add_experts_"]
    if ex:
        out.append(f"{'experts (bf16, r=16)':<22} {'provider':<28} {'median ms':>10} {'x fastest pass':>14}")
    for r in ex:
        out.append(f"{str(r['E']) + 'x' + str(r['m']) + 'x' + str(r['n']):<22} {r['provider']:<28} "
                   f"{r['median_ms']:>10.3f} {fmt(r.get('fraction_of_fastest_pass')):>14}")
    return out


SUITE = Suite("patch_add_experts", frozenset({"patch_add_experts_"}), derive, table)
