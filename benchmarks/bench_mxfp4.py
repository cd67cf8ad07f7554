"""The MXFP4 merge (portllm.mxfp4.merge_ of one expert: dequantize, add s·B·A, keep the block scales that
still fit, requantize onto the e2m1 grid, the retention sums for both roundings), one GPT-OSS-20B
gate_up_proj expert (5760 rows of 2880 inputs, packed: 8.3 MB), r=16, against passes over its packed
bytes (an in-place uint8 pass: 1 byte read and written per byte; a copy), in one run: ``ops.mxfp4_merge``
on the reference (PyTorch, band by band) and the C++ kernel (row by row, one pass), on every CPU path.
The floor on a CPU is not the pass but the arithmetic: two e2m1 elements per byte, r=16 float64
products each (exact products, so that every backend's bits agree), and two roundings each.
"""

import os

import pytest
import torch
from benchutil import DEVICE, QUICK, derive_vs_inplace_pass, table_vs_inplace_pass
from suite import Suite

from portllm import _ext, mxfp4, ops

R, K = (64, 128) if QUICK else (5760, 2880)
ROUNDS = 3


@pytest.fixture(scope="module")
def expert():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(R, K, generator=g) * 0.02
    scales = mxfp4.fresh_scales(W)
    blocks = mxfp4.quantize(W, scales)
    B, A = torch.randn(R, 16, generator=g) * 0.01, torch.randn(16, K, generator=g) * 0.01
    return blocks, scales, B, A


_ISA_ORDER = ("generic", "avx2", "avx512", "avx512bf16")
ISAS = ([i for i in reversed(_ISA_ORDER[: _ISA_ORDER.index(_ext.cpu_isa()) + 1])]
        if _ext.cpu_isa() in _ISA_ORDER and ops.backend_unavailable_reason("cpp", "cpu", "mxfp4_merge") is None else [])
PASSES = ["in-place uint8", "copy"]
PROVIDERS = PASSES + (["mxfp4_merge-reference"] + [f"mxfp4_merge-cpp@{isa}" for isa in ISAS]
                      if DEVICE.type == "cpu" else [])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mxfp4_merge(benchmark, expert, provider, rounding):
    if provider in PASSES and rounding != "nearest":
        pytest.skip("a pass does not round: measured once")
    blocks, scales, B, A = expert
    base, _, isa = provider.partition("@")
    if provider in PASSES:
        packed = blocks.clone()
        fn = {"in-place uint8": lambda: packed.add_(0), "copy": lambda: packed.clone()}[provider]
    else:
        backend = base.removeprefix("mxfp4_merge-")

        def fn():
            if isa:
                os.environ["PORTLLM_CPU_ISA"] = isa
            try:
                return mxfp4.merge_(blocks[None], scales[None], {0: (B, A, 0.5)}, rounding=rounding, backend=backend)
            finally:
                os.environ.pop("PORTLLM_CPU_ISA", None)
    benchmark.group = "mxfp4 merge"
    info = dict(op="mxfp4_merge", provider=base, case=rounding, m=R, n=K, r=16, dtype="mxfp4", bytes=2 * R * K // 2)
    if isa:
        info["isa"] = isa
    benchmark.extra_info.update(info)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def derive(rows: list[dict]):
    derive_vs_inplace_pass(rows, "mxfp4_merge")


def table(rows: list[dict]) -> list[str]:
    return table_vs_inplace_pass(rows, "mxfp4_merge", "mxfp4 merge", PASSES, 34)


SUITE = Suite("mxfp4", frozenset({"mxfp4_merge"}), derive, table)
