"""Porting an expert LoRA onto a Qwen3-MoE-shaped bf16 checkpoint (8 layers, hidden 1024, 64 experts of
384, about 1.4 GB, random weights, on-disk names as transformers saves them: one tensor per expert and
projection), in one run, each a whole command in a process of its own:

* ``cp + sync``: ``cp -r`` of the checkpoint directory, then ``sync`` (the I/O floor of any port);
* ``portllm port``: the CLI, start-up included; its peak RSS (the process's own ``ru_maxrss``).

The adapter is PEFT's target_parameters layout (r=16 on both expert parameters of every layer, and on
q_proj/v_proj). The checkpoint is generated once into PORTLLM_BENCH_CACHE (default
/tmp/portllm-bench-cache). PORTLLM_BENCH_QUICK=1 uses a small model instead.
"""

import json
import os
import shutil
import sys

import pytest
import torch
from benchutil import QUICK, timed_command, write_checkpoint
from suite import Suite, fmt

CACHE = os.environ.get("PORTLLM_BENCH_CACHE", "/tmp/portllm-bench-cache")
SHAPE = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=500, intermediate_size=128) if QUICK else \
    dict(hidden_size=1024, moe_intermediate_size=384, num_experts=64, num_hidden_layers=8, num_attention_heads=16,
         num_key_value_heads=4, head_dim=64, vocab_size=32000, intermediate_size=2048)
RANK = 16
SHARD_BYTES = 1 << 29


def _config():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(num_experts_per_tok=4, tie_word_embeddings=False, **SHAPE)
    cfg.dtype = torch.bfloat16
    return cfg


def make_checkpoint(path):
    """Random bf16 weights under the names transformers saves (its save-side conversion run on meta
    tensors), written tensor by tensor."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    config = _config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}
    write_checkpoint(path, config, shapes, SHARD_BYTES)


def make_adapter(path):
    """PEFT's layout for target_parameters (experts.base_layer.* = gate_up_proj, experts.* = down_proj)
    and target_modules, random factors, fp32 as PEFT saves them."""
    from safetensors.torch import save_file

    H, I, E, L = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"], SHAPE["num_hidden_layers"]
    q = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    v = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    g = torch.Generator().manual_seed(1)
    t = {}
    for i in range(L):
        p = f"base_model.model.model.layers.{i}."
        for key, (out, inn, rows) in {"mlp.experts.base_layer": (2 * I, H, E * RANK), "mlp.experts": (H, I, E * RANK),
                                      "self_attn.q_proj": (q, H, RANK), "self_attn.v_proj": (v, H, RANK)}.items():
            t[f"{p}{key}.lora_A.weight"] = torch.randn(rows, inn, generator=g) * 0.01
            t[f"{p}{key}.lora_B.weight"] = torch.randn(out, rows, generator=g) * 0.01
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(t, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"],
                   "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}, f)
    os.rename(tmp, path)


@pytest.fixture(scope="module")
def files():
    tag = "quick" if QUICK else "1b4"
    ckpt, adapter = os.path.join(CACHE, f"qwen3moe-{tag}"), os.path.join(CACHE, f"qwen3moe-{tag}-adapter-r{RANK}")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    if not os.path.exists(adapter):
        make_adapter(adapter)
    nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    return {"ckpt": ckpt, "adapter": adapter, "bytes": nbytes}


@pytest.mark.parametrize("provider", ["cp + sync", "portllm port"])
def test_port_moe(benchmark, files, provider):
    out = os.path.join(CACHE, "out-moe")
    shutil.rmtree(out, ignore_errors=True)
    portllm = os.path.join(os.path.dirname(sys.executable), "portllm")
    argv = (["sh", "-c", f"cp -r '{files['ckpt']}' '{out}' && sync"] if provider == "cp + sync" else
            [portllm, "port", "--model", files["ckpt"], "--patch", files["adapter"], "--out", out, "--quiet"])
    result = {}

    def job():
        shutil.rmtree(out, ignore_errors=True)
        result["seconds"], result["rss"] = timed_command(argv)

    try:
        benchmark.pedantic(job, rounds=1, iterations=1)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    benchmark.group = "port moe"
    benchmark.extra_info.update(op="port_moe", provider=provider, case="checkpoint", seconds=result["seconds"],
                                peak_rss=result["rss"], checkpoint_bytes=files["bytes"], bytes=files["bytes"],
                                experts=SHAPE["num_experts"], layers=SHAPE["num_hidden_layers"], r=RANK)


def derive(rows: list[dict]):
    """The port's whole command over the copy's, same run."""
    by = {r["provider"]: r for r in rows if r["op"] == "port_moe"}
    copy = by.get("cp + sync")
    for r in by.values():
        r["median_ms"] = round(r["seconds"] * 1e3, 1)
        r["gbps"] = round(r["checkpoint_bytes"] / r["seconds"] / 1e9, 3)
        if copy:
            r["time_vs_copy"] = round(r["seconds"] / copy["seconds"], 3)


def table(rows: list[dict]) -> list[str]:
    by = [r for r in rows if r["op"] == "port_moe"]
    if not by:
        return []
    out = [f"{'MoE port (whole command)':<26} {'seconds':>8} {'peak RSS MiB':>13} {'x cp+sync':>9}"]
    for r in by:
        out.append(f"{r['provider']:<26} {r['seconds']:>8.2f} {r['peak_rss'] / 2**20:>13.1f} "
                   f"{fmt(r.get('time_vs_copy')):>9}")
    return out


SUITE = Suite("port_moe", frozenset({"port_moe"}), derive, table)
