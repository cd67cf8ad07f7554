"""vLLM's throughput with LoRA adapters, vLLM's own LoRA path against portllm's kernels as its backend,
in one run (issue #25). Runs in the vLLM venv (make test-vllm makes it):

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--quick] [--json PATH]

A Llama built from a config (hidden 1024, 8 layers, 16 heads of 64, 4 KV heads, MLP 2816, vocabulary
32000: 0.17 B parameters, bf16; random weights: throughput does not depend on them), 8 LoRA adapters
of rank 16 on every linear layer. Per engine configuration (no LoRA; vLLM's own LoRA path; portllm's
backend) and adapter mix (the 8 requests on 1 adapter, or each on its own): decode tokens/s (8
requests, 16-token prompts, 129 tokens generated, the 1-token run's time subtracted) and prefill
tokens/s (8 requests of 512 tokens, 1 generated). Each figure is the median of --rounds runs after a
warm-up; prefix caching off, so a repeated prompt is computed again. Writes the rows, the engine
settings and the versions to benchmarks/vllm_results/<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             intermediate_size=2816, vocab_size=32000, max_position_embeddings=2048)
ADAPTERS, RANK, BATCH = 8, 16, 8


def build(tmp: str, quick: bool) -> tuple[str, list[str]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SHAPE, num_hidden_layers=2) if quick else SHAPE
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    base = os.path.join(tmp, "base")
    m.to(torch.bfloat16).save_pretrained(base)
    adapters = []
    for i in range(ADAPTERS):
        torch.manual_seed(100 + i)
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                            LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        adapters.append(os.path.join(tmp, f"lora{i}"))
        pm.save_pretrained(adapters[-1])
    return base, adapters


def engine_kwargs(lora: bool) -> dict:
    kw = dict(dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
              max_num_seqs=BATCH, enable_prefix_caching=False, seed=0)
    if lora:
        kw.update(enable_lora=True, max_loras=ADAPTERS, max_lora_rank=RANK)
    return kw


def timed(llm, prompts, new: int, loras, rounds: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=new, min_tokens=new, temperature=0, detokenize=False, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(tp, sp, lora_request=loras, use_tqdm=False)  # warm-up (and the adapters loaded)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = llm.generate(tp, sp, lora_request=loras, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(o.outputs[0].token_ids) == new for o in outs)
    return statistics.median(times)


def measure(base: str, adapters: list[str], backend: str, mix: str | None, rounds: int, quick: bool) -> dict:
    import torch
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    sys.path.insert(0, os.path.join(ROOT, "tests_vllm"))
    from conftest import plugin_on  # the same opt-in as the tests (portllm.vllm_plugin.register)

    g = torch.Generator().manual_seed(1)
    short = [torch.randint(3, 32000, (16,), generator=g).tolist() for _ in range(BATCH)]
    long_ = [torch.randint(3, 32000, (128 if quick else 512,), generator=g).tolist() for _ in range(BATCH)]
    loras = None
    if mix is not None:
        reqs = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
        loras = [reqs[0]] * BATCH if mix == "1 adapter" else [reqs[i % ADAPTERS] for i in range(BATCH)]
    new = 33 if quick else 129
    ctx = plugin_on() if backend == "portllm" else _nothing()
    with ctx:
        t_start = time.perf_counter()
        llm = LLM(model=base, **engine_kwargs(mix is not None))
        startup = time.perf_counter() - t_start
        try:
            t_new = timed(llm, short, new, loras, rounds)
            t_one = timed(llm, short, 1, loras, rounds)
            t_prefill = timed(llm, long_, 1, loras, rounds)
        finally:
            del llm
            gc.collect()
    return {"backend": backend, "adapters": mix or "none", "decode_tok_s": BATCH * (new - 1) / (t_new - t_one),
            "prefill_tok_s": BATCH * len(long_[0]) / t_prefill, "decode_s": t_new - t_one, "prefill_s": t_prefill,
            "startup_s": startup, "decode_tokens": BATCH * (new - 1), "prefill_tokens": BATCH * len(long_[0])}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["adapters"] == "none")
    out = ["| LoRA path | adapters (8 requests) | decode tok/s | vs no LoRA | prefill tok/s | vs no LoRA |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['backend'] if r['adapters'] != 'none' else '(no LoRA)'} | {r['adapters']} | "
                   f"{r['decode_tok_s']:.0f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                   f"{r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, short runs: checks the plumbing")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="default: benchmarks/vllm_results/<device>.json (not with --quick)")
    a = ap.parse_args(argv)
    import torch
    import transformers
    import vllm

    import portllm
    from portllm import _ext

    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(tmp, a.quick)
        rows = [measure(base, adapters, "vllm", None, a.rounds, a.quick)]
        for mix in ("1 adapter", "8 adapters"):
            for backend in ("vllm", "portllm"):
                rows.append(measure(base, adapters, backend, mix, a.rounds, a.quick))
    print(table(rows))
    result = {"device": {"type": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "portllm": portllm.__version__,
                           "portllm_build": _ext.build_info()},
              "engine": dict(engine_kwargs(True), VLLM_CPU_KVCACHE_SPACE=os.environ["VLLM_CPU_KVCACHE_SPACE"],
                             VLLM_ENABLE_V1_MULTIPROCESSING=os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]),
              "model": dict(SHAPE, num_hidden_layers=2 if a.quick else SHAPE["num_hidden_layers"], dtype="bfloat16"),
              "adapters": {"count": ADAPTERS, "rank": RANK, "target_modules": "all-linear"},
              "rounds": a.rounds, "command": "benchmarks/vllm_throughput.py" + (" --quick" if a.quick else ""),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    path = a.json or (None if a.quick else os.path.join(HERE, "vllm_results", "cpu.json"))
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
