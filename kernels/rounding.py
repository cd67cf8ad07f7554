"""Rounding helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN -> 0x7FC0 (as torch), in integer arithmetic.
    Triton's interpreter truncates in .to(tl.bfloat16) whatever the rounding mode asked for; this
    gives the same bits on every target, and costs a few integer ops in a memory-bound kernel."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    h = tl.where(x != x, 0x7FC0, u >> 16)
    return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
