"""`portllm demo`: a short port of a LoRA-shaped patch onto a small, randomly initialised
transformers Llama, with portllm's patch_add_ kernels, checked against exact arithmetic.

This is the foundation's demo; the full portability experiment (pretrain, evolve, fine-tune,
port, evaluate) replaces it when that work lands. Nothing is downloaded: the model is built from a
config and its weights are random.
"""

from __future__ import annotations

import time

import torch

from portllm import _ext, ops
from portllm.reference import patch_add_exact

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(hidden: int, layers: int, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    return LlamaForCausalLM(config).to(dtype).eval()


def random_patch(model, rank: int, seed: int, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA-shaped factors for every target projection: B [out, r], A [r, in], in bf16, sized so
    the update is a few percent of the weights, as a trained LoRA's is."""
    g = torch.Generator().manual_seed(seed)
    patch = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            out_f, in_f = mod.weight.shape
            B = (torch.randn(out_f, rank, generator=g) * 0.004).to(torch.bfloat16)
            A = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
            patch[name] = (B.to(device), A.to(device))
    return patch


def ulps_vs_exact(out: torch.Tensor, exact: torch.Tensor) -> int:
    """Largest distance, in units in the last place of out's dtype, from the exact result."""
    rounded = exact.to(out.dtype)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[out.dtype]
    a, b = out.view(bits).to(torch.int64), rounded.view(bits).to(torch.int64)
    return int((a - b).abs().max()) if out.numel() else 0


def run(hidden: int = 512, layers: int = 4, rank: int = 8, alpha: float = 16.0, dtype: str = "bfloat16",
        backend: str | None = None, seed: int = 0, device: str = "cpu") -> dict:
    torch_dtype = getattr(torch, dtype)
    print(f"portllm demo: port a rank-{rank} patch onto a random Llama (hidden {hidden}, {layers} layers, {dtype})")
    print(f"  build: {_ext.build_info()}; backends on {device}: {', '.join(ops.available_backends(device))}")
    t0 = time.perf_counter()
    model = build_model(hidden, layers, torch_dtype, seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  model: {n_params / 1e6:.1f} M parameters, built in {time.perf_counter() - t0:.1f} s")

    patch = random_patch(model, rank, seed + 1, device)
    scale = alpha / rank
    modules = dict(model.named_modules())
    name0 = next(iter(patch))
    before = modules[name0].weight.detach().clone()

    tokens = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        logits_before = model(tokens).logits.float()

    chosen = ops.resolve_backend(backend, device)
    touched = 0
    t0 = time.perf_counter()
    for name, (B, A) in patch.items():
        W = modules[name].weight
        ops.patch_add_(W, B, A, scale, backend=chosen)
        touched += W.numel()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    bytes_moved = 2 * touched * torch.empty((), dtype=torch_dtype).element_size()

    B, A = patch[name0]
    worst = ulps_vs_exact(modules[name0].weight.detach().cpu(), patch_add_exact(before, B, A, scale).cpu())
    with torch.no_grad():
        logits_after = model(tokens).logits.float()
    change = ((logits_after - logits_before).norm() / logits_before.norm()).item()

    print(f"  merged {len(patch)} modules ({touched / 1e6:.1f} M weights) with backend '{chosen}' "
          f"in {elapsed * 1e3:.1f} ms ({bytes_moved / elapsed / 1e9:.1f} GB/s of weight traffic)")
    print(f"  check: {name0} is within {worst} ulp of W + {scale:g}·B·A computed exactly")
    print(f"  the patched model's logits moved by {change:.2%} (relative norm) on a random prompt")
    return {"modules": len(patch), "weights": touched, "seconds": elapsed, "backend": chosen,
            "max_ulp": worst, "logit_change": change}
