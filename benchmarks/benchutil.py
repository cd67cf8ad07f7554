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


# Runs argv and prints its wall seconds and peak RSS: a small launcher, because a process forked from the
# benchmark's (pytest, hundreds of MB) would report that one's RSS as its own peak (Linux keeps the
# high-water mark across fork and exec).
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t0, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status))
"""


def timed_command(argv: list[str]) -> tuple[float, int]:
    """Wall seconds of a whole command, from launch to exit, and its peak RSS in bytes."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *argv], capture_output=True, text=True)
    seconds, rss, code = res.stdout.split()[-3:] if res.stdout.split() else ("0", "0", "1")
    if res.returncode != 0 or int(code) != 0:
        raise RuntimeError(f"{argv[0]} failed: {res.stderr[-2000:]}")
    return float(seconds), int(rss)


def write_checkpoint(path: str, config, shapes: dict, shard_bytes: int):
    """A checkpoint directory of random bf16 weights (2-D: N(0, 0.02); others: ones) under the given
    names and shapes, in shards of at most ``shard_bytes``, written tensor by tensor into a temporary
    directory renamed into place (never the whole model in memory)."""
    import json
    import shutil

    from portllm.safetensors_io import SafetensorsWriter

    shards, cur, size = [], [], 0
    for k, s in shapes.items():
        nbytes = 2 * torch.Size(s).numel()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes
    shards.append(cur)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(tmp, fname), [(k, torch.bfloat16, shapes[k]) for k in keys],
                               {"format": "pt"}) as w:
            for k in keys:
                t = (torch.randn(shapes[k], generator=g) * 0.02).to(torch.bfloat16) if len(shapes[k]) == 2 \
                    else torch.ones(shapes[k], dtype=torch.bfloat16)
                w.write(k, t)
                weight_map[k] = fname
                total += t.numel() * 2
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(tmp)
    os.rename(tmp, path)
