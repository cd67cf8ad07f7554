"""Where portllm's vLLM backend switches kernels (portllm/vllm_punica.py, MAX_TOKENS_PER_ADAPTER):
lora_shrink + lora_expand_ on the C++ kernels against the reference, one thread, x [T, 1024] bf16 ->
rank 16 -> 2816 columns, B laid out as the backend keeps it ([P, R, m]), 8 adapter slots, the T tokens
on one adapter or spread over all 8; beside the base layer's GEMM. Prints microseconds per call.

    .venv/bin/python benchmarks/vllm_ops_crossover.py
"""

import time

import torch

from portllm import ops


def per_call_us(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(1)
    n, m, R, P = 1024, 2816, 16, 8
    A = torch.randn(P, 1, R, n).bfloat16()[:, 0]
    B = torch.randn(P, R, m).bfloat16().transpose(1, 2)
    one = torch.ones(P)
    W = torch.randn(m, n).bfloat16()
    print("| tokens | adapters | C++ us | reference us | base GEMM us |\n|---|---|---|---|---|")
    for T in (1, 8, 12, 16, 32, 128, 512, 1024):
        x, y = torch.randn(T, n).bfloat16(), torch.randn(T, m).bfloat16()
        for spread in (1, P):
            slots = torch.arange(T) % spread
            t = {}
            for be in ("cpp", "reference"):
                def f():
                    ops.lora_expand_(y, ops.lora_shrink(x, A, slots, backend=be), B, one, slots, backend=be)
                t[be] = per_call_us(f)
            print(f"| {T} | {spread} | {t['cpp']:.0f} | {t['reference']:.0f} | "
                  f"{per_call_us(lambda: torch.nn.functional.linear(x, W)):.0f} |")


if __name__ == "__main__":
    main()
