"""Porting a rank-16 patch onto a 1.1B Llama-shaped bf16 checkpoint (hidden 2048, 22 layers, MLP 5632,
random weights, sharded), in one run:

* ``copy files``: copying the checkpoint directory (the I/O floor of any port);
* ``portllm port``: the streaming port (peak RSS above the interpreter's own is recorded);
* ``peft``: from_pretrained + PeftModel + merge_and_unload + save_pretrained;
* in memory: ``portllm.apply_patch`` against PEFT's ``merge_and_unload`` alone.

Each job runs in its own process (benchmarks/port_jobs.py). The checkpoint is generated once into
PORTLLM_BENCH_CACHE (default /tmp/portllm-bench-cache, about 2.2 GB). PORTLLM_BENCH_QUICK=1 uses a
small model instead.
"""

import os
import shutil
import sys

import pytest
import torch
from benchutil import DEVICE, QUICK, write_checkpoint
from suite import Suite, fmt

from portllm.memory import run_measured

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("PORTLLM_BENCH_CACHE", "/tmp/portllm-bench-cache")
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8, vocab_size=1000) \
    if QUICK else dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       vocab_size=32000)
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 1 << 30


def make_checkpoint(path):
    """Random bf16 weights written tensor by tensor (never the whole model in memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048, **SHAPE)
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
    Patch(mods, base_model="random 1.1B Llama").save(path, overwrite=True)


@pytest.fixture(scope="module")
def files():
    tag = "quick" if QUICK else "1b1"
    ckpt, patch = os.path.join(CACHE, f"llama-{tag}"), os.path.join(CACHE, f"patch-{tag}-r{RANK}")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(ckpt):
        shapes = make_checkpoint(ckpt)
    else:
        from portllm.checkpoint import Checkpoint

        with Checkpoint(ckpt) as c:
            shapes = {k: c.shape(k) for k in c.keys()}
    if not os.path.exists(patch):
        make_patch(patch, shapes)
    nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    return {"ckpt": ckpt, "patch": patch, "bytes": nbytes, "params": sum(torch.Size(s).numel() for s in shapes.values())}


def run_job(job, files, device="cpu"):
    out = os.path.join(CACHE, f"out-{job}")
    shutil.rmtree(out, ignore_errors=True)
    try:
        return run_measured([sys.executable, os.path.join(HERE, "port_jobs.py"), job, files["ckpt"], files["patch"],
                             out, device], f"job {job}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


JOBS = [("copy files", "copy", "cpu"), ("portllm port", "port", "cpu"),
        ("peft load+merge_and_unload+save", "peft", "cpu"),
        ("portllm apply_patch (in memory)", "apply", "cpu"), ("peft merge_and_unload (in memory)", "peft_merge", "cpu")]
if DEVICE.type == "cuda":
    JOBS.insert(2, ("portllm port --device cuda", "port", "cuda"))


@pytest.mark.parametrize("provider,job,device", JOBS, ids=[j[0] for j in JOBS])
def test_port(benchmark, files, provider, job, device):
    result = {}
    benchmark.pedantic(lambda: result.update(run_job(job, files, device)), rounds=1, iterations=1)
    benchmark.group = "port 1.1B" if not QUICK else "port (quick)"
    benchmark.extra_info.update(
        op="port", case="in_memory" if job in ("apply", "peft_merge") else "checkpoint", provider=provider,
        device=device, params=files["params"], checkpoint_bytes=files["bytes"], rank=RANK, seconds=result["seconds"],
        peak_rss_above_baseline=result["peak_rss_above_baseline"], baseline_rss=result["baseline_rss"],
        peak_gpu_bytes=result.get("peak_gpu_bytes"))


def derive(rows: list[dict]):
    """Port jobs: time relative to copying the files, and PEFT's time relative to each."""
    by = {r["provider"]: r for r in rows if r["op"] == "port"}
    copy, peft = by.get("copy files"), by.get("peft load+merge_and_unload+save")
    peft_mem = by.get("peft merge_and_unload (in memory)")
    for r in by.values():
        if r["case"] == "checkpoint" and copy:
            r["time_vs_copy"] = round(r["seconds"] / copy["seconds"], 3)
        if r["case"] == "checkpoint" and peft and r is not peft:
            r["speedup_vs_peft"] = round(peft["seconds"] / r["seconds"], 3)
        if r["case"] == "in_memory" and peft_mem and r is not peft_mem:
            r["speedup_vs_peft"] = round(peft_mem["seconds"] / r["seconds"], 3)


def table(rows: list[dict]) -> list[str]:
    ports = [r for r in rows if r["op"] == "port"]
    if not ports:
        return []
    out = [f"{'port job':<40} {'seconds':>9} {'peak RSS MiB':>13} {'x copy':>7} {'PEFT / this':>11}"]
    for r in ports:
        out.append(f"{r['provider']:<40} {r['seconds']:>9.2f} {r['peak_rss_above_baseline'] / 2**20:>13.1f} "
                   f"{fmt(r.get('time_vs_copy')):>7} {fmt(r.get('speedup_vs_peft')):>11}")
    return out


SUITE = Suite("port", frozenset({"port"}), derive, table)
