"""Porting an expert LoRA onto a Qwen3-MoE-shaped bf16 checkpoint (8 layers, hidden 1024, 64 experts of
384, about 1.4 GB, random weights, on-disk names as transformers saves them: one tensor per expert and
projection), in one run, each a whole command in a process of its own:

* ``cp + sync``: ``cp -r`` of the checkpoint directory, then ``sync`` (the I/O floor of any port);
* ``portllm port``: the CLI, start-up included; its peak RSS (the process's own ``ru_maxrss``).

The adapter is PEFT's target_parameters layout (r=16 on both expert parameters of every layer, and on
q_proj/v_proj). The checkpoint is generated once into PORTLLM_BENCH_CACHE (default
/tmp/portllm-bench-cache). PORTLLM_BENCH_QUICK=1 uses a small model instead.
"""

import os

import pytest
import torch
from benchutil import QUICK, derive_vs_copy, port_against_copy, table_vs_copy, write_checkpoint, write_peft_adapter
from suite import Suite

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
    H, I, E = SHAPE["hidden_size"], SHAPE["moe_intermediate_size"], SHAPE["num_experts"]
    q = SHAPE["num_attention_heads"] * SHAPE["head_dim"]
    v = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    write_peft_adapter(path, SHAPE["num_hidden_layers"],
                       {"mlp.experts.base_layer": (2 * I, H, E * RANK), "mlp.experts": (H, I, E * RANK),
                        "self_attn.q_proj": (q, H, RANK), "self_attn.v_proj": (v, H, RANK)},
                       {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["q_proj", "v_proj"],
                        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]})


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
    benchmark.group = "port moe"
    port_against_copy(benchmark, files, provider, os.path.join(CACHE, "out-moe"), [],
                      dict(op="port_moe", experts=SHAPE["num_experts"], layers=SHAPE["num_hidden_layers"], r=RANK))


def derive(rows: list[dict]):
    """The port's whole command over the copy's, same run."""
    derive_vs_copy(rows, "port_moe")


def table(rows: list[dict]) -> list[str]:
    return table_vs_copy(rows, "port_moe", "MoE port (whole command)")


SUITE = Suite("port_moe", frozenset({"port_moe"}), derive, table)
