"""Small transformers Llamas, PEFT adapters trained on them, and evolved copies, made in code."""

import os

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(hidden=64, layers=2, vocab=128):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def llama(seed=0, dtype=torch.float32, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**kw)).to(dtype).eval()


def evolve(model, strength=0.05, seed=1):
    """Continued pretraining stand-in: every weight moves by `strength` of its own norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g).to(p.dtype)
            p.add_(noise * (strength * p.float().norm() / max(noise.float().norm(), 1e-12)).to(p.dtype))
    return model


def train_peft_adapter(base, out_dir, r=4, alpha=8, steps=3, seed=0, **lora_kw):
    """A LoRA adapter trained a few steps on random tokens by PEFT, saved by PEFT (safetensors)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, **lora_kw)
    model = get_peft_model(base, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.randint(0, base.config.vocab_size, (2, 16))
    model.train()
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    assert os.path.exists(os.path.join(out_dir, "adapter_model.safetensors"))
    base_model = model.unload()  # the base model without LoRA layers, unchanged
    return base_model
