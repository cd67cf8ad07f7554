"""Porting a rank-16 patch (all seven projections) onto Llama-shaped bf16 checkpoints of about 1 GB
(hidden 2048, MLP 5632, 9 layers) and 4 GB (hidden 4096, MLP 11008, 10 layers), random weights, in one
run, each job in a process of its own:

* ``copy+fsync``: copying the checkpoint's files (the kernel's copy) and fsyncing them: the floor;
* ``portllm port (job)``: ``portllm.port``, the job alone (the port's own report), and its peak RSS
  above the interpreter's (imports done);
* ``portllm port (command)``: the ``portllm port`` command, start-up included, and its peak RSS;
* the stages of the port's stream, each alone over the same bytes (read, merge, write+fsync);
* on 1 GB: PEFT's from_pretrained + PeftModel + merge_and_unload + save_pretrained, and in memory,
  ``portllm.apply_patch`` against PEFT's ``merge_and_unload`` alone.

The copy, the port and the command run interleaved, three rounds (the disk's speed wanders from one
second to the next on shared machines); each row is the median. The checkpoints are generated once
into PORTLLM_BENCH_CACHE (default /tmp/portllm-bench-cache, about 5 GB; the outputs need as much
again). PORTLLM_BENCH_QUICK=1 uses a small model, one round.
"""

import os
import shutil
import statistics
import sys

import pytest
import torch
from benchutil import DEVICE, QUICK, timed_command, write_checkpoint
from suite import Suite, fmt

from portllm.memory import run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("PORTLLM_BENCH_CACHE", "/tmp/portllm-bench-cache")
SIZES = {"quick": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=1000)} if QUICK else {
    "1GB": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=9, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000),
    "4GB": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=10, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)}
PEFT_SIZES = {"quick", "1GB"}
OTHER_ISAS = ("avx512", "avx2", "generic")  # the C++ kernel's paths below this machine's (PORTLLM_CPU_ISA)
ROUNDS = 1 if QUICK else 3
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 1 << 30


def make_checkpoint(path, shape):
    """Random bf16 weights written tensor by tensor (never the whole model in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(tie_word_embeddings=False, max_position_embeddings=2048, **shape)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    write_checkpoint(path, config, shapes, SHARD_BYTES)
    return shapes


def make_patch(path, shapes):
    from portllm.patch import Patch, PatchModule

    g = torch.Generator().manual_seed(1)
    mods = {}
    for k, s in shapes.items():
        name = k.removesuffix(".weight")
        if name.rsplit(".", 1)[-1] in TARGETS:
            B = (torch.randn(s[0], RANK, generator=g) * 0.01).to(torch.bfloat16)
            A = (torch.randn(RANK, s[1], generator=g) * 0.01).to(torch.bfloat16)
            mods[name] = PatchModule(B, A, 2.0)
    Patch(mods, base_model="random Llama").save(path, overwrite=True)


def files_for(size: str) -> dict:
    ckpt, patch = os.path.join(CACHE, f"llama-{size}"), os.path.join(CACHE, f"patch-{size}-r{RANK}")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt, SIZES[size])
    from portllm.checkpoint import Checkpoint

    with Checkpoint(ckpt) as c:
        shapes = {k: c.shape(k) for k in c.keys()}
    if not os.path.exists(patch):
        make_patch(patch, shapes)
    nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    return {"ckpt": ckpt, "patch": patch, "bytes": nbytes, "params": sum(torch.Size(s).numel() for s in shapes.values())}


def run_job(job, files, device="cpu", isa=None):
    out = os.path.join(CACHE, f"out-{job}")
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    try:
        return run_measured([sys.executable, os.path.join(HERE, "port_jobs.py"), job, files["ckpt"], files["patch"],
                             out, device], f"job {job}", env=dict(os.environ, PORTLLM_CPU_ISA=isa) if isa else None)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_command(files, device="cpu") -> dict:
    """``portllm port`` as a user runs it: wall seconds from launch to exit, and its peak RSS."""
    out = os.path.join(CACHE, "out-command")
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    argv = [os.path.join(os.path.dirname(sys.executable), "portllm"), "port", "--model", files["ckpt"], "--patch",
            files["patch"], "--out", out, "--quiet", "--device", device]
    try:
        seconds, rss = timed_command(argv)
        return {"seconds": seconds, "peak_rss": rss}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def interpreter_rss() -> int:
    """Peak RSS of a process that imports what the port's command imports, and does nothing."""
    return timed_command([sys.executable, "-c", "import torch, portllm.port"])[1]


@pytest.fixture(scope="module", params=sorted(SIZES))
def measured(request):
    """Every job of one size; the copy, the port and the command interleaved, ROUNDS rounds."""
    size = request.param
    files = files_for(size)
    rounds = {"copy": [], "port": [], "command": []}
    for _ in range(ROUNDS):
        rounds["copy"].append(run_job("copy", files))
        rounds["port"].append(run_job("port", files))
        rounds["command"].append(run_command(files))
    res = {"files": files, "size": size, "rounds": rounds, "stages": run_job("stages", files),
           "interpreter_rss": interpreter_rss()}
    if DEVICE.type == "cuda":
        res["port_cuda"] = run_job("port", files, "cuda")
    if size in PEFT_SIZES:
        for job in ("peft", "apply", "peft_merge"):
            res[job] = run_job(job, files)
        if DEVICE.type == "cpu":  # the other CPU classes' merge paths, forced (one round each)
            for isa in OTHER_ISAS:
                res[f"port-{isa}"] = run_job("port", files, isa=isa)
    return res


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


PROVIDERS = ["copy+fsync", "portllm port (job)", "portllm port (command)", "stages",
             "peft load+merge_and_unload+save", "portllm apply_patch (in memory)", "peft merge_and_unload (in memory)",
             "portllm port --device cuda (job)", *[f"portllm port (job), PORTLLM_CPU_ISA={isa}" for isa in OTHER_ISAS]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_port(benchmark, measured, provider):
    m, files = measured, measured["files"]
    rounds = m["rounds"]
    info = dict(op="port", size=m["size"], provider=provider, device="cpu", params=files["params"],
                checkpoint_bytes=files["bytes"], rank=RANK, case="checkpoint", rounds=ROUNDS)
    if provider == "copy+fsync":
        info.update(seconds=_median(rounds["copy"], "seconds"), all_seconds=[r["seconds"] for r in rounds["copy"]],
                    peak_rss_above_baseline=max(r["peak_rss_above_baseline"] for r in rounds["copy"]))
    elif provider == "portllm port (job)":
        info.update(seconds=_median(rounds["port"], "job_seconds"),
                    all_seconds=[r["job_seconds"] for r in rounds["port"]],
                    peak_rss_above_baseline=max(r["peak_rss_above_baseline"] for r in rounds["port"]),
                    baseline_rss=rounds["port"][0]["baseline_rss"])
    elif provider == "portllm port (command)":
        info.update(seconds=_median(rounds["command"], "seconds"),
                    all_seconds=[r["seconds"] for r in rounds["command"]],
                    peak_rss=max(r["peak_rss"] for r in rounds["command"]), interpreter_rss=m["interpreter_rss"],
                    peak_rss_above_baseline=max(r["peak_rss"] for r in rounds["command"]) - m["interpreter_rss"])
    elif provider == "stages":
        st = m["stages"]
        info.update(case="stages", seconds=sum(st["stages"].values()), stage_seconds=st["stages"],
                    stage_gbps={k: round(st["bytes"] / v / 1e9, 3) for k, v in st["stages"].items() if v},
                    peak_rss_above_baseline=None)
    elif provider.startswith("portllm port (job), PORTLLM_CPU_ISA="):
        r = m.get(f"port-{provider.rsplit('=', 1)[1]}")
        if r is None:
            pytest.skip("the forced CPU paths are measured on the first size, on CPU runs")
        info.update(seconds=r["job_seconds"], peak_rss_above_baseline=r["peak_rss_above_baseline"], rounds=1)
    elif provider == "portllm port --device cuda (job)":
        if "port_cuda" not in m:
            pytest.skip("no CUDA device")
        r = m["port_cuda"]
        info.update(device="cuda", seconds=r["job_seconds"], peak_rss_above_baseline=r["peak_rss_above_baseline"],
                    peak_gpu_bytes=r.get("peak_gpu_bytes"))
    else:
        job = {"peft load+merge_and_unload+save": "peft", "portllm apply_patch (in memory)": "apply",
               "peft merge_and_unload (in memory)": "peft_merge"}[provider]
        if job not in m:
            pytest.skip(f"PEFT is measured on {', '.join(sorted(PEFT_SIZES))} only")
        r = m[job]
        info.update(case="in_memory" if job != "peft" else "checkpoint", seconds=r["seconds"],
                    peak_rss_above_baseline=r["peak_rss_above_baseline"], baseline_rss=r["baseline_rss"])
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # (timed in the fixture: each job in its process)
    benchmark.group = f"port {m['size']}"
    benchmark.extra_info.update(info)


def derive(rows: list[dict]):
    """Per size: time over copy+fsync; PEFT's time and memory over the port's."""
    for size in {r.get("size") for r in rows if r["op"] == "port"}:
        by = {r["provider"]: r for r in rows if r["op"] == "port" and r.get("size") == size}
        copy, peft = by.get("copy+fsync"), by.get("peft load+merge_and_unload+save")
        peft_mem = by.get("peft merge_and_unload (in memory)")
        for r in by.values():
            if r["case"] == "checkpoint" and copy:
                r["time_vs_copy"] = round(r["seconds"] / copy["seconds"], 3)
            if r["case"] == "checkpoint" and peft and r["provider"].endswith("(job)"):  # job against job
                r["speedup_vs_peft"] = round(peft["seconds"] / r["seconds"], 3)
                if r.get("peak_rss_above_baseline"):
                    r["peft_memory_vs_this"] = round(peft["peak_rss_above_baseline"] / r["peak_rss_above_baseline"], 2)
            if r["case"] == "in_memory" and peft_mem and r is not peft_mem:
                r["speedup_vs_peft"] = round(peft_mem["seconds"] / r["seconds"], 3)


def table(rows: list[dict]) -> list[str]:
    ports = [r for r in rows if r["op"] == "port"]
    if not ports:
        return []
    out = [f"{'size':<5} {'port job':<40} {'seconds':>9} {'peak RSS MiB':>13} {'x copy':>7} {'PEFT / this':>11}"]
    for r in ports:
        rss = r.get("peak_rss_above_baseline")
        out.append(f"{r.get('size', ''):<5} {r['provider']:<40} {r['seconds']:>9.2f} "
                   f"{fmt(rss / 2**20 if rss is not None else None, '.1f'):>13} "
                   f"{fmt(r.get('time_vs_copy')):>7} {fmt(r.get('speedup_vs_peft')):>11}")
        if r["case"] == "stages":
            out.append("      " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in r["stage_gbps"].items()))
    return out


SUITE = Suite("port", frozenset({"port"}), derive, table)
