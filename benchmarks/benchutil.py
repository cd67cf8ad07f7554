"""Shared helpers of the benchmark suites: the device, synchronisation, peak-memory probes.

Run through `make bench` (benchmarks/run.py), which writes benchmarks/results/<device>.json.
Set PORTLLM_BENCH_DEVICE=cpu to benchmark the CPU on a GPU machine, PORTLLM_BENCH_QUICK=1 for a
small smoke run (tiny shapes, few rounds; its results are not written to benchmarks/results).
"""

import os

import torch

DEVICE = torch.device(os.environ.get("PORTLLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("PORTLLM_BENCH_QUICK") == "1"


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def extra_peak_memory(fn) -> int | None:
    """Bytes allocated at the peak of one call of fn beyond what was allocated before it.
    CUDA: the caching allocator's peak. CPU: the process's peak RSS (reset through
    /proc/self/clear_refs), so it counts every allocation, torch's or not."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() - base
    from portllm.memory import reset_peak_rss, rss

    if not reset_peak_rss():
        return None
    base = rss("VmRSS")
    fn()
    return max(0, rss("VmHWM") - base)
