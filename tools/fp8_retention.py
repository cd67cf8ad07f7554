"""How much of a patch survives requantization into block FP8 (portllm.fp8), for the README: a random
4096x4096 weight (std 0.02) quantized to e4m3 in 128x128 blocks, a rank-16 update of 1%, 5% and 20% of its
RMS, merged with each rounding.

    .venv/bin/python tools/fp8_retention.py
"""

import torch

from portllm import fp8

BLOCK = (128, 128)


def main():
    g = torch.Generator().manual_seed(11)
    q, s = fp8.quantize(torch.randn(4096, 4096, generator=g) * 0.02, BLOCK)
    W = fp8.dequantize(q, s, BLOCK)
    print("| update (RMS, of the weight's) | rounding | retained | noise (of the update's norm) |")
    print("|---:|---|---:|---:|")
    for rel in (0.01, 0.05, 0.2):
        B, A = torch.randn(4096, 16, generator=g), torch.randn(16, 4096, generator=g)
        scale = rel * float(W.pow(2).mean().sqrt()) / float((B @ A).pow(2).mean().sqrt())
        for rounding in fp8.ROUNDINGS:
            st = fp8.merge_(q, s, B, A, torch.full((16,), scale), BLOCK, rounding=rounding, seed=0)[2]
            print(f"| {rel:.0%} | {rounding} | {st.retained:.3f} | {st.noise:.2f} |")


if __name__ == "__main__":
    main()
