"""The experiment on a user's own checkpoints: θ (--base), θ′ (--evolved), a patch made on θ, and a
task file. Evaluates θ, θ + Δ (merged in memory), θ′ and θ′ + Δ (ported with ``portllm.port``).

Task file: JSON lines ``{"task": "name", "prompt": "...", "answer": "..."}``; an example counts as
right when the model's most likely next token after the prompt is the answer's first token.
"""

from __future__ import annotations

import copy
import json
import os

import torch


def read_tasks(path: str) -> dict[str, list[tuple[str, str]]]:
    tasks: dict[str, list[tuple[str, str]]] = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
                tasks.setdefault(str(ex.get("task", "task")), []).append((ex["prompt"], ex["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: expected {{\"task\", \"prompt\", \"answer\"}} JSON ({e})") from None
    if not tasks:
        raise ValueError(f"{path}: no examples")
    return tasks


@torch.no_grad()
def accuracy_per_example(model, tokenizer, examples) -> float:
    """Fraction of (prompt, answer) examples whose next-token argmax after the prompt is the answer's
    first token, one example at a time (a user's tokenizer may have no padding token)."""
    right = 0
    for prompt, answer in examples:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        target = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError(f"answer {answer!r} has no tokens")
        right += int(model(input_ids=ids).logits[0, -1].argmax().item() == target[0])
    return right / len(examples)


def run_user(base: str, evolved: str, patch_path: str, tasks_file: str, out: str, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import portllm
    from portllm.experiment.plot import task_bars

    tasks = read_tasks(tasks_file)
    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    if not any(os.path.isfile(os.path.join(base, f)) for f in tok_files):
        raise ValueError(f"--base {base}: no tokenizer files ({', '.join(tok_files[:3])}, ...): the evaluation "
                         "needs the base's tokenizer; save it there (tokenizer.save_pretrained(DIR))")
    try:
        tok = AutoTokenizer.from_pretrained(base)
    except Exception as e:  # noqa: BLE001 (transformers' messages name the wrong thing here)
        raise ValueError(f"--base {base}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    patch = portllm.Patch.load(patch_path)
    os.makedirs(out, exist_ok=True)
    ported_dir = os.path.join(out, "ported")
    log(f"porting {patch_path} onto {evolved} with portllm.port")
    portllm.port(evolved, patch, ported_dir, force=True, progress=False, log=None)
    theta = AutoModelForCausalLM.from_pretrained(base).eval()
    models = {"theta": theta, "theta+patch": portllm.apply_patch(copy.deepcopy(theta), patch),
              "evolved": AutoModelForCausalLM.from_pretrained(evolved).eval(),
              "evolved+patch (ported)": AutoModelForCausalLM.from_pretrained(ported_dir).eval()}
    results = {"base": base, "evolved": evolved, "patch": patch_path, "tasks": {}}
    for name, ex in tasks.items():
        results["tasks"][name] = {k: accuracy_per_example(m, tok, ex) for k, m in models.items()}
        log(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in results["tasks"][name].items()))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    task_bars(results, os.path.join(out, "accuracy.png"))
    return results
