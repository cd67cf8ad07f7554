"""One training step of a Llama-shaped model (random weights, bf16, AdamW, seq 2048, all seven
projections adapted): PMSS r=256 against PEFT's LoRA r=8, in the same process.

Records tokens per second (median step time after warm-up), peak GPU memory of the step, trainable
parameters, and for PMSS the time ``pmss.inject`` took to select every skeleton (DEIM). Models:
1.1B (22 layers, hidden 2048, MLP 5632, batch 4) and 7B (32 layers, 4096, 11008, batch 1). A GPU
suite: on a CPU it runs only in the quick smoke test (a tiny model), and skips otherwise.
"""

import statistics
import time

import pytest
import torch
from benchutil import DEVICE, QUICK, sync
from suite import Suite, fmt

MODELS = {
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, batch=4),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, batch=1),
}
if QUICK:
    MODELS = {"tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, batch=2)}
SEQ = 64 if QUICK else 2048
STEPS, WARMUP = (3, 1) if QUICK else (8, 3)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPE = torch.bfloat16


def _model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in cfg.items() if k != "batch"}
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=SEQ, **kw)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # built in bf16 on the device: no fp32 copy of a 7B model
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model


@pytest.mark.parametrize("provider", ["peft-lora-r8", "pmss-r256"])
@pytest.mark.parametrize("size", list(MODELS))
def test_train_step(benchmark, size, provider):
    if DEVICE.type != "cuda" and not QUICK:
        pytest.skip("a GPU suite (training steps of 1.1B and 7B models)")
    pytest.importorskip("transformers")
    cfg = MODELS[size]
    model = _model(cfg)
    info = dict(op="train_step", model=size, provider=provider, batch=cfg["batch"], seq=SEQ, dtype="bfloat16",
                bytes=0)
    if provider == "peft-lora-r8":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        from portllm import pmss

        sync()
        t0 = time.perf_counter()
        pmss.inject(model, rank=4 if QUICK else 256)
        sync()
        info["inject_seconds"] = round(time.perf_counter() - t0, 3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, 32000, (cfg["batch"], SEQ), device=DEVICE, generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    for _ in range(WARMUP):
        step()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []

    def timed():
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    benchmark.group = f"train step {size}"
    benchmark.pedantic(timed, rounds=STEPS, iterations=1)
    if DEVICE.type == "cuda":
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    info["tokens_per_s"] = round(cfg["batch"] * SEQ / statistics.median(times), 1)
    benchmark.extra_info.update(info)
    del model, opt
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def derive(rows: list[dict]):
    """Training steps: PMSS's tokens/s and peak memory relative to PEFT LoRA's, per model size."""
    lora = {r["model"]: r for r in rows if r["op"] == "train_step" and r["provider"] == "peft-lora-r8"}
    for r in rows:
        if r["op"] != "train_step":
            continue
        r.pop("gbps", None)
        base = lora.get(r["model"])
        if base is not None and r is not base:
            r["tokens_per_s_vs_lora"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            if r.get("peak_memory_bytes") and base.get("peak_memory_bytes"):
                r["memory_vs_lora"] = round(r["peak_memory_bytes"] / base["peak_memory_bytes"], 3)


def table(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["op"] == "train_step":
            mem = r.get("peak_memory_bytes")
            out.append(f"train step {r['model']:<5} {r['provider']:<14} {r['tokens_per_s']:>10.0f} tok/s  "
                       f"x LoRA {r.get('tokens_per_s_vs_lora', 1.0):.2f}  peak "
                       f"{fmt(mem / 2**30 if mem else None)} GiB  x LoRA {fmt(r.get('memory_vs_lora'))}"
                       + (f"  inject {r['inject_seconds']:.1f} s" if "inject_seconds" in r else ""))
    return out


SUITE = Suite("train", frozenset({"train_step"}), derive, table)
