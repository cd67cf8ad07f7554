"""The block-FP8 merge (portllm.fp8.merge_: dequantize, add s·B·A in fp32, requantize with fresh block
scales), e4m3 W 4096x14336 in 128x128 blocks, r=16, against passes over the FP8 weight's bytes (an in-place
uint8 pass: 1 byte read and written per element; a copy), in one run. The merge is the PyTorch reference
path; no C++ or Triton kernel yet.
"""

import pytest
import torch
from benchutil import DEVICE, QUICK
from suite import Suite, fmt

from portllm import fp8

M, N = (256, 384) if QUICK else (4096, 14336)
BLOCK = (128, 128)
ROUNDS = 3


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    q, s = fp8.quantize(torch.randn(M, N, generator=g) * 0.02, BLOCK)
    B, A = torch.randn(M, 16, generator=g) * 0.01, torch.randn(16, N, generator=g) * 0.01
    return q, s, B, A


@pytest.mark.parametrize("provider", ["in-place uint8", "copy", "fp8 nearest", "fp8 stochastic"])
def test_fp8_merge(benchmark, weight, provider):
    if DEVICE.type != "cpu":
        pytest.skip("the FP8 merge runs its PyTorch reference path on the CPU only")
    q, s, B, A = weight
    sc = torch.full((16,), 0.5)
    qi = q.view(torch.uint8)
    fn = {"in-place uint8": lambda: qi.add_(0), "copy": lambda: qi.clone(),
          "fp8 nearest": lambda: fp8.merge_(q, s, B, A, sc, BLOCK),
          "fp8 stochastic": lambda: fp8.merge_(q, s, B, A, sc, BLOCK, rounding="stochastic")}[provider]
    benchmark.group = "fp8 merge"
    benchmark.extra_info.update(op="fp8_merge", provider=provider, m=M, n=N, r=16, dtype="float8_e4m3fn",
                                bytes=2 * M * N)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)


def derive(rows: list[dict]):
    rows_ = [r for r in rows if r["op"] == "fp8_merge"]
    base = next((r for r in rows_ if r["provider"] == "in-place uint8"), None)
    for r in rows_:
        if base is not None:
            r["fraction_of_inplace_pass"] = round(base["median_ms"] / r["median_ms"], 4)


def table(rows: list[dict]) -> list[str]:
    rows_ = [r for r in rows if r["op"] == "fp8_merge"]
    if not rows_:
        return []
    shape = f"{rows_[0]['m']}x{rows_[0]['n']}"
    out = [f"{'fp8 merge ' + shape + ' r=16':<32} {'median ms':>10} {'x in-place pass':>16}"]
    for r in rows_:
        out.append(f"{r['provider']:<32} {r['median_ms']:>10.1f} {fmt(r.get('fraction_of_inplace_pass'), '.4f'):>16}")
    return out


SUITE = Suite("fp8", frozenset({"fp8_merge"}), derive, table)
