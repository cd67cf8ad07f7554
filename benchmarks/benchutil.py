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


def write_peft_adapter(path: str, layers: int, factors: dict[str, tuple[int, int, int]], config: dict):
    """A PEFT LoRA adapter directory: for every layer and every ``module: (out, in, rows)`` of ``factors``
    (``rows``: r, or E·r for a target_parameters pair), random fp32 factors of 0.01, as PEFT saves them,
    with ``config`` as adapter_config.json; written into a temporary directory renamed into place."""
    import json
    import shutil

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(layers):
        p = f"base_model.model.model.layers.{i}."
        for key, (out, inn, rows) in factors.items():
            t[f"{p}{key}.lora_A.weight"] = torch.randn(rows, inn, generator=g) * 0.01
            t[f"{p}{key}.lora_B.weight"] = torch.randn(out, rows, generator=g) * 0.01
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(t, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", **config}, f)
    os.rename(tmp, path)


def port_against_copy(benchmark, files: dict, provider: str, out: str, port_args: list[str], info: dict):
    """One whole command in a process of its own, timed with its peak RSS: ``cp -r`` of ``files["ckpt"]``
    then ``sync`` (provider "cp + sync"), or ``portllm port`` of it with ``files["adapter"]`` and
    ``port_args``; ``out`` removed before and after; ``info`` and the figures go into the row."""
    import shutil
    import sys

    shutil.rmtree(out, ignore_errors=True)
    portllm = os.path.join(os.path.dirname(sys.executable), "portllm")
    argv = (["sh", "-c", f"cp -r '{files['ckpt']}' '{out}' && sync"] if provider == "cp + sync" else
            [portllm, "port", "--model", files["ckpt"], "--patch", files["adapter"], "--out", out, "--quiet",
             *port_args])
    result = {}

    def job():
        shutil.rmtree(out, ignore_errors=True)
        result["seconds"], result["rss"] = timed_command(argv)

    try:
        benchmark.pedantic(job, rounds=1, iterations=1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    benchmark.extra_info.update(provider=provider, case="checkpoint", seconds=result["seconds"],
                                peak_rss=result["rss"], checkpoint_bytes=files["bytes"], bytes=files["bytes"], **info)


def derive_vs_copy(rows: list[dict], op: str):
    """For ``port_against_copy`` rows of ``op``: milliseconds, GB/s and the time over the copy's, same run."""
    by = {r["provider"]: r for r in rows if r["op"] == op}
    copy = by.get("cp + sync")
    for r in by.values():
        r["median_ms"] = round(r["seconds"] * 1e3, 1)
        r["gbps"] = round(r["checkpoint_bytes"] / r["seconds"] / 1e9, 3)
        if copy:
            r["time_vs_copy"] = round(r["seconds"] / copy["seconds"], 3)


def table_vs_copy(rows: list[dict], op: str, title: str) -> list[str]:
    from suite import fmt

    by = [r for r in rows if r["op"] == op]
    if not by:
        return []
    out = [f"{title:<26} {'seconds':>8} {'peak RSS MiB':>13} {'x cp+sync':>9}"]
    for r in by:
        out.append(f"{r['provider']:<26} {r['seconds']:>8.2f} {r['peak_rss'] / 2**20:>13.1f} "
                   f"{fmt(r.get('time_vs_copy')):>9}")
    return out


def derive_vs_inplace_pass(rows: list[dict], op: str):
    """Each row of ``op`` as a fraction of the "in-place uint8" pass's time, same run."""
    base = next((r for r in rows if r["op"] == op and r["provider"] == "in-place uint8"), None)
    for r in rows:
        if r["op"] == op and base is not None:
            r["fraction_of_inplace_pass"] = round(base["median_ms"] / r["median_ms"], 4)


def table_vs_inplace_pass(rows: list[dict], op: str, title: str, passes, width: int) -> list[str]:
    from suite import fmt

    rows_ = [r for r in rows if r["op"] == op]
    if not rows_:
        return []
    head = f"{title} {rows_[0]['m']}x{rows_[0]['n']} r=16"
    out = [f"{head:<{width}} {'median ms':>10} {'x in-place pass':>16}"]
    for r in rows_:
        name = r["provider"] + (f"@{r['isa']}" if r.get("isa") else "") + (
            f" {r['case']}" if r["provider"] not in passes else "")
        out.append(f"{name:<{width}} {r['median_ms']:>10.1f} {fmt(r.get('fraction_of_inplace_pass'), '.4f'):>16}")
    return out
