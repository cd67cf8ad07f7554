"""Tiny models and adapters for the vLLM tests, built from configs (nothing downloaded), and the
greedy references they are compared with (transformers, PEFT).

The model is a Llama small enough to build in a second but shaped for vLLM's CPU attention (head
size 32: it supports 32, 64, 80, ... only), with weights drawn wide (normal, sd 0.2) so that greedy
decoding is decided by clear margins, not by ties."""

from __future__ import annotations

import torch

VOCAB = 256
PROMPTS = [[1, 5, 17, 42, 99, 3], [1, 200, 13, 7], [1, 9, 9, 9, 9, 9, 9, 9, 30], [1, 77, 150, 2, 64, 31, 8]]
NEW = 16  # tokens generated per prompt: 4 × 16 = 64 in all


def config(layers: int = 2, vocab: int = VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, intermediate_size=128, vocab_size=vocab, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def model(seed: int = 0, vocab: int = VOCAB):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(config(vocab=vocab))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return m.eval()


def save_model(m, path: str, dtype=torch.float32) -> str:
    m.to(dtype).save_pretrained(path)
    m.float()
    return path


def evolved(m, seed: int, h: float = 0.3):
    """θ′ = θ + h·(random direction of each weight's size): a vendor's update, for the port."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(m)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.add_(h * 0.2 * torch.randn(p.shape, generator=g))
    return out


def lora_adapter(base_dir: str, path: str, rank: int = 8, seed: int = 1, target="all-linear") -> str:
    """A PEFT LoRA saved by PEFT, with B drawn at random (not PEFT's zeros) so that it changes tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(path)
    return path


def hf(model_dir: str, adapter: str | None = None, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if adapter:
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    return m.eval()


@torch.no_grad()
def greedy(m, prompts=PROMPTS, new: int = NEW) -> list[list[int]]:
    """Greedy tokens, one full forward per step (no cache, no generation config to second-guess)."""
    out = []
    for p in prompts:
        ids = list(p)
        for _ in range(new):
            ids.append(int(m(torch.tensor([ids])).logits[0, -1].float().argmax()))
        out.append(ids[len(p):])
    return out


@torch.no_grad()
def ties_taken(m, got: list[list[int]], prompts=PROMPTS, tol: float = 0.05) -> tuple[int, float]:
    """vLLM's bf16 tokens fed through the reference (teacher forcing): the positions where a token is
    not the reference's argmax, and the largest logit gap among them. The reference is the model the
    bf16 weights define, computed in fp32 (``m`` is upcast here); vLLM computes in bf16 (activations
    rounded to 8 significant bits at every layer), so where two logits lie within its rounding of
    each other (a near-tie: a few hundredths at logits of 2-8) it may take either. Any larger gap is a
    real difference. Returns (positions differing, largest gap); raises if a gap exceeds ``tol``."""
    m = m.float()
    n, worst = 0, 0.0
    for p, o in zip(prompts, got):
        logits = m(torch.tensor([list(p) + list(o)])).logits[0].float()[len(p) - 1:len(p) - 1 + len(o)]
        gap = logits.max(-1).values - logits[torch.arange(len(o)), torch.tensor(o)]
        n += int((gap > 0).sum())
        worst = max(worst, float(gap.max()))
    if worst > tol:
        raise AssertionError(f"a token off the reference's argmax by {worst:.4f} (> {tol}): not a tie")
    return n, worst


@torch.no_grad()
def clear_prompts(m, n: int = 4, pool: int = 32, tol: float = 0.05, seed: int = 0) -> list[list[int]]:
    """``n`` prompts, out of ``pool`` drawn at random, whose greedy continuations in ``m`` (computed in
    fp32) come closest to no near-tie (top two logits within ``2·tol``): on those, a bf16 engine
    that takes the other side of a tie shows as at most a token or two, and a real difference still
    shows. Deterministic: the same prompts for the same model."""
    m = m.float()
    g = torch.Generator().manual_seed(seed)
    cands = [[1] + torch.randint(3, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
             for _ in range(pool)]
    scored = []
    for i, p in enumerate(cands):
        ids, close = list(p), 0
        for _ in range(NEW):
            top = m(torch.tensor([ids])).logits[0, -1].float().topk(2)
            close += int(top.values[0] - top.values[1] < 2 * tol)
            ids.append(int(top.indices[0]))
        scored.append((close, i))
    return [cands[i] for _, i in sorted(scored)[:n]]
