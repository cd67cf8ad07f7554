"""Porting an expert LoRA onto a GPT-OSS-shaped MXFP4 checkpoint (3 layers of GPT-OSS-20B's shape: hidden
2880, 32 experts of 2880, their gate_up_proj and down_proj packed MXFP4 as GPT-OSS ships them, attention
and embeddings in bf16 with a 32000-token vocabulary; about 1.6 GB, random weights), in one run, each a
whole command in a process of its own:

* ``cp + sync``: ``cp -r`` of the checkpoint directory, then ``sync`` (the I/O floor of any port);
* ``portllm port``: the CLI, start-up included (stochastic rounding: nearest would be refused, keeping
  nothing of a small update); its peak RSS (the process's own ``ru_maxrss``).

The adapter is PEFT's target_parameters layout (r=16 on both expert parameters of every layer, and on
q_proj/v_proj). Generated once into PORTLLM_BENCH_CACHE (default /tmp/portllm-bench-cache);
PORTLLM_BENCH_QUICK=1 uses a small model instead.
"""

import json
import os
import shutil

import pytest
import torch
from benchutil import QUICK, derive_vs_copy, port_against_copy, table_vs_copy, write_peft_adapter
from suite import Suite

CACHE = os.environ.get("PORTLLM_BENCH_CACHE", "/tmp/portllm-bench-cache")
SHAPE = dict(hidden_size=64, intermediate_size=64, num_local_experts=4, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=500) if QUICK else \
    dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_hidden_layers=3, num_attention_heads=64,
         num_key_value_heads=8, head_dim=64, vocab_size=32000)
RANK = 16
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_checkpoint(path):
    """Random weights under GPT-OSS's on-disk names, the experts quantized by the format's own quantizer
    (``mxfp4.fresh_scales`` / ``quantize``), one safetensors file per layer, written into a temporary
    directory renamed into place."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    from portllm import mxfp4
    from portllm.safetensors_io import SafetensorsWriter

    cfg = GptOssConfig(num_experts_per_tok=4, tie_word_embeddings=False, max_position_embeddings=4096,
                       layer_types=["full_attention"] * SHAPE["num_hidden_layers"], **SHAPE)
    cfg.dtype = torch.bfloat16
    cfg.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for k in shapes:
        layer = k.split(".")[2] if k.startswith("model.layers.") else "other"
        groups.setdefault(layer, []).append(k)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, (name, keys) in enumerate(sorted(groups.items())):
        fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        layout, tensors = [], {}
        for k in keys:
            if k.endswith(EXPERTS):
                E, K, R = shapes[k]  # GPT-OSS holds [E, in, out]; the blocks are [E, out, in/32, 16]
                layout += [(k + "_blocks", torch.uint8, (E, R, K // 32, 16)),
                           (k + "_scales", torch.uint8, (E, R, K // 32))]
            else:
                layout.append((k, torch.bfloat16, shapes[k]))
        with SafetensorsWriter(os.path.join(tmp, fname), layout, {"format": "pt"}) as w:
            for k in keys:
                if k.endswith(EXPERTS):
                    E, K, R = shapes[k]
                    blocks, scales = [], []
                    for _ in range(E):
                        W = torch.randn(R, K, generator=g) * 0.02
                        s = mxfp4.fresh_scales(W)
                        blocks.append(mxfp4.quantize(W, s))
                        scales.append(s)
                    tensors = {k + "_blocks": torch.stack(blocks), k + "_scales": torch.stack(scales)}
                else:
                    s = shapes[k]
                    tensors = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) if len(s) == 2
                               else torch.ones(s, dtype=torch.bfloat16)}
                for key, t in tensors.items():
                    w.write(key, t)
                    weight_map[key] = fname
                    total += t.numel() * t.element_size()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg.save_pretrained(tmp)
    os.rename(tmp, path)


def make_adapter(path):
    """PEFT's layout for target_parameters (experts.base_layer.* = gate_up_proj, experts.* = down_proj) and
    target_modules, random factors of about 1% of the weights, fp32 as PEFT saves them."""
    H, I, E = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_local_experts"]
    q = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    v = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    write_peft_adapter(path, SHAPE["num_hidden_layers"],
                       {"mlp.experts.base_layer": (2 * I, H, E * RANK), "mlp.experts": (H, I, E * RANK),
                        "self_attn.q_proj": (q, H, RANK), "self_attn.v_proj": (v, H, RANK)},
                       {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"],
                        "target_parameters": list(EXPERTS)})


@pytest.fixture(scope="module")
def files():
    tag = "quick" if QUICK else "3l"
    ckpt = os.path.join(CACHE, f"gptoss-mxfp4-{tag}")
    adapter = os.path.join(CACHE, f"gptoss-mxfp4-{tag}-adapter-r{RANK}")
    os.makedirs(CACHE, exist_ok=True)
    if not os.path.exists(ckpt):
        make_checkpoint(ckpt)
    if not os.path.exists(adapter):
        make_adapter(adapter)
    nbytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    return {"ckpt": ckpt, "adapter": adapter, "bytes": nbytes}


@pytest.mark.parametrize("provider", ["cp + sync", "portllm port"])
def test_port_mxfp4(benchmark, files, provider):
    benchmark.group = "port mxfp4"
    port_against_copy(benchmark, files, provider, os.path.join(CACHE, "out-mxfp4"), ["--rounding", "stochastic"],
                      dict(op="port_mxfp4", experts=SHAPE["num_local_experts"], layers=SHAPE["num_hidden_layers"],
                           r=RANK))


def derive(rows: list[dict]):
    """The port's whole command over the copy's, same run."""
    derive_vs_copy(rows, "port_mxfp4")


def table(rows: list[dict]) -> list[str]:
    return table_vs_copy(rows, "port_mxfp4", "MXFP4 port (whole command)")


SUITE = Suite("port_mxfp4", frozenset({"port_mxfp4"}), derive, table)
