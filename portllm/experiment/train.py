"""Training and evaluation for the experiment: pretraining, continued pretraining, fine-tuning with
LoRA (PEFT) or PMSS, and answer accuracy. Small enough for a 2-core CPU."""

from __future__ import annotations

import copy
import random

import torch

from portllm.experiment import data


def build_model(seed: int, hidden: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(data.VOCAB), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=None,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def _pad(seqs: list[list[int]], labels: list[list[int]] | None = None):
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(labels[i] if labels is not None else s)
    return ids, mask, lab


def _loop(model, batches, steps: int, lr: float, progress=None, desc: str = ""):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    model.train()
    loss = None
    for step in range(steps):
        ids, mask, lab = batches(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(desc, step + 1, steps, loss.item())
    model.eval()
    return loss.item() if loss is not None else float("nan")


def pretrain(model, tokenizer, texts: list[str], steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0,
             progress=None, desc: str = "pretrain"):
    """Next-token training on the corpus (also the vendor's continued pretraining)."""
    enc = _encode(tokenizer, texts)
    rng = random.Random(seed)

    def batches(_):
        return _pad(rng.sample(enc, batch))

    return _loop(model, batches, steps, lr, progress, desc)


def _task_batches(tokenizer, task: str, seed: int, batch: int):
    """Batches of the task's train split."""
    rng = random.Random(seed)
    vocab = tokenizer.get_vocab()

    def batches(step):
        ex = data.task_examples(task, batch, seed=rng.randrange(1 << 30), split="train")
        seqs, labels = [], []
        for prompt, answer in ex:
            ids = tokenizer(prompt)["input_ids"] + [vocab[answer]]
            seqs.append(ids)
            labels.append([-100] * (len(ids) - 1) + [ids[-1]])
        return _pad(seqs, labels)

    return batches


def finetune_lora(model, tokenizer, task: str, steps: int, r: int = 8, lr: float = 3e-3, seed: int = 0,
                  progress=None, desc: str = "", batch: int = 32):
    """LoRA (PEFT) on all seven projections of a copy of ``model``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    _loop(peft_model, _task_batches(tokenizer, task, seed, batch), steps, lr, progress, desc)
    return peft_model


def finetune_pmss(model, tokenizer, task: str, steps: int, r: int = 16, lr: float = 3e-3, scale: float = 2.0,
                  seed: int = 0, progress=None, desc: str = "", batch: int = 32):
    """PMSS on all seven projections of a copy of ``model``; returns the injected model."""
    from portllm import pmss

    m = pmss.inject(copy.deepcopy(model), rank=r, scale=scale, seed=seed)
    torch.manual_seed(seed)
    _loop(m, _task_batches(tokenizer, task, seed, batch), steps, lr, progress, desc)
    return m


def tune(finetune, model, tokenizer, task: str, lrs, **kw):
    """``finetune`` (finetune_lora or finetune_pmss) at each learning rate of the grid; the one with the
    best accuracy on the task's val split (a tie to the smaller lr). Returns (model, lr, {lr: val acc})."""
    best, val = None, {}
    for lr in lrs:
        m = finetune(model, tokenizer, task, lr=lr, **kw)
        val[lr] = accuracy_batched(m, tokenizer, task, n=128, seed=77, split="val")
        if best is None or val[lr] > val[best[1]]:
            best = (m, lr)
    return best[0], best[1], val


@torch.no_grad()
def accuracy_batched(model, tokenizer, task: str, n: int = 256, seed: int = 99, split: str = "test") -> float:
    """Fraction of n prompts of a built-in task's split (by default test: never trained on, never used to
    choose anything) whose next-token argmax is the answer, all prompts in one padded batch."""
    model.eval()
    vocab = tokenizer.get_vocab()
    ex = data.task_examples(task, n, seed, split=split)
    seqs = _encode(tokenizer, [p for p, _ in ex])
    ids, mask, _ = _pad(seqs)
    logits = model(input_ids=ids, attention_mask=mask).logits
    last = torch.tensor([len(s) - 1 for s in seqs])
    pred = logits[torch.arange(len(seqs)), last].argmax(-1)
    gold = torch.tensor([vocab[a] for _, a in ex])
    return (pred == gold).float().mean().item()
