"""The block-FP8 merge (portllm.fp8.merge_: dequantize, add s·B·A in fp32, requantize with fresh block
scales), e4m3 W 4096x14336 in 128x128 blocks, r=16, against passes over the FP8 weight's bytes (an in-place
uint8 pass: 1 byte read and written per element; a copy), in one run: ``ops.fp8_merge`` on the
reference (PyTorch, band by band) and the C++ kernel (block by block, one pass), both roundings; and
the compressed-tensors FP8 merge (portllm.fp8_compressed.merge_, PyTorch ops only) on the same weight
quantized per output channel with bf16 scales (provider ``ct_merge-reference``, FP8_DYNAMIC's layout).
On a GPU: the passes, the reference and the Triton kernel (one program per block), on the GPU.
The floor on a CPU is not the pass but the arithmetic: r=16 products per element in float64
(exact products, so that every backend's bits agree) is 16 fused multiply-adds per weight byte.
"""

import os

import pytest
import torch
from benchutil import DEVICE, QUICK, derive_vs_inplace_pass, sync, table_vs_inplace_pass
from suite import Suite

from portllm import _ext, fp8, fp8_compressed, ops

M, N = (256, 384) if QUICK else (4096, 14336)
BLOCK = (128, 128)
ROUNDS = 3


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    q, s = fp8.quantize(torch.randn(M, N, generator=g) * 0.02, BLOCK)
    B, A = torch.randn(M, 16, generator=g) * 0.01, torch.randn(16, N, generator=g) * 0.01
    W = fp8.dequantize(q, s, BLOCK).to(torch.bfloat16)  # the same weight, quantized per channel (bf16 scales)
    cs = fp8_compressed.scales_for(W.abs().amax(dim=1, keepdim=True), torch.bfloat16)
    cq = (W / cs).clamp(-448, 448).to(fp8.E4M3)
    return tuple(t.to(DEVICE) for t in (q, s, B, A)) + (cq, cs)


_ISA_ORDER = ("generic", "avx2", "avx512", "avx512bf16")
ISAS = ([i for i in reversed(_ISA_ORDER[: _ISA_ORDER.index(_ext.cpu_isa()) + 1])]
        if _ext.cpu_isa() in _ISA_ORDER and ops.backend_unavailable_reason("cpp", "cpu", "fp8_merge") is None else [])
PASSES = ["in-place uint8", "copy"]
PROVIDERS = PASSES + (["fp8_merge-reference", "fp8_merge-triton"] if DEVICE.type == "cuda" else
                      ["fp8_merge-reference"] + [f"fp8_merge-cpp@{isa}" for isa in ISAS] + ["ct_merge-reference"])


@pytest.mark.parametrize("rounding", fp8.ROUNDINGS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fp8_merge(benchmark, weight, provider, rounding):
    if provider in PASSES and rounding != "nearest":
        pytest.skip("a pass does not round: measured once")
    q, s, B, A, cq, cs = weight
    sc = torch.full((16,), 0.5, device=DEVICE)
    qi = q.view(torch.uint8)
    base, _, isa = provider.partition("@")
    backend = base.removeprefix("fp8_merge-") if base.startswith("fp8_merge-") else None
    if provider in PASSES:
        op = {"in-place uint8": lambda: qi.add_(0), "copy": lambda: qi.clone()}[provider]

        def fn():
            op()
            sync()
    elif provider == "ct_merge-reference":
        def fn():
            return fp8_compressed.merge_(cq, cs, B.cpu(), A.cpu(), sc.cpu(), (1, N), rounding=rounding)
    else:
        def fn():
            if isa:
                os.environ["PORTLLM_CPU_ISA"] = isa
            try:
                out = fp8.merge_(q, s, B, A, sc, BLOCK, rounding=rounding, backend=backend)
                sync()
                return out
            finally:
                os.environ.pop("PORTLLM_CPU_ISA", None)
    benchmark.group = "fp8 merge"
    info = dict(op="fp8_merge", provider=base, case=rounding, m=M, n=N, r=16, dtype="float8_e4m3fn", bytes=2 * M * N)
    if isa:
        info["isa"] = isa
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def derive(rows: list[dict]):
    derive_vs_inplace_pass(rows, "fp8_merge")


def table(rows: list[dict]) -> list[str]:
    return table_vs_inplace_pass(rows, "fp8_merge", "fp8 merge", PASSES, 32)


SUITE = Suite("fp8", frozenset({"fp8_merge"}), derive, table)
