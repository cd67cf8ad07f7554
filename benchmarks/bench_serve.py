"""Serving patches, in one run: a patched layer against the base GEMM, and decoding with patches mixed in
the batch against the base model and PEFT.

* ``serve_layer``: y = x·Wᵀ + s_p·(x·A_pᵀ)·B_pᵀ for T tokens, bf16, r = 16. Providers: ``base``
  (x·Wᵀ alone), ``peft-style`` (one patch: x·Wᵀ + ((x·Aᵀ)·Bᵀ)·s), ``peft-loop`` (eight patches: a
  masked product per patch, as PEFT's mixed batch), ``serve-<backend>`` (PatchedLinear). On a GPU,
  T <= 32 is also timed inside CUDA graphs (``graph``: True), as serving stacks decode.
* ``serve_decode``: ``model.generate`` of a Llama-shaped model with random weights, batch 32, eight
  patches (r = 16, all seven projections) mixed over the rows: tokens per second of the base model,
  of portllm.serve and of PEFT with ``adapter_names=``. 1.1B-shaped on a GPU; smaller on a CPU.
"""

import copy
import statistics
import time

import pytest
import torch
from benchutil import DEVICE, QUICK, sync
from suite import Suite, fmt

from portllm import ops
from portllm.serve.layer import PatchedLinear

DTYPE = torch.bfloat16
RANK, PATCHES = 16, 8
if QUICK:
    LAYER_SHAPES, TOKENS, ROUNDS = [(256, 512)], (1, 32), 3
elif DEVICE.type == "cuda":
    LAYER_SHAPES, TOKENS, ROUNDS = [(4096, 4096), (4096, 14336)], (1, 8, 32, 128, 512, 2048), 50
else:
    LAYER_SHAPES, TOKENS, ROUNDS = [(4096, 4096), (4096, 14336)], (1, 8, 32, 128), 20
SERVE_BACKENDS = [b for b in ops.available_backends(DEVICE, "lora_shrink")
                  if not (b == "triton" and DEVICE.type == "cpu")]


def _graphed(fn):
    """fn captured in a CUDA graph (replayed as one launch), or None where capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception:  # a provider that synchronises (the reference's data-dependent grouping)
        torch.cuda.synchronize()
        return None


def _layer(n_in, n_out, gen):
    lin = torch.nn.Linear(n_in, n_out, bias=False, device=DEVICE, dtype=DTYPE).requires_grad_(False)
    lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, device=DEVICE).to(DTYPE) * n_in**-0.5)
    return lin


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("provider", ["base", "peft-style", "peft-loop"] + [f"serve-{b}" for b in SERVE_BACKENDS])
@pytest.mark.parametrize("case", ["one_patch", "eight_mixed"])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("n_in,n_out", LAYER_SHAPES, ids=str)
def test_serve_layer(benchmark, n_in, n_out, T, case, provider, graph):
    if graph and (DEVICE.type != "cuda" or T > 32):
        pytest.skip("CUDA graphs: on a GPU, for decode sizes (T <= 32)")
    if (provider == "peft-style" and case != "one_patch") or (provider == "peft-loop" and case != "eight_mixed"):
        pytest.skip("peft-style is the one-patch way, peft-loop the mixed-batch way")
    if provider == "base" and case != "one_patch":
        pytest.skip("the base does not depend on the patches: measured once")
    gen = torch.Generator(device=DEVICE).manual_seed(T)
    lin = _layer(n_in, n_out, gen)
    x = torch.randn(T, n_in, generator=gen, device=DEVICE).to(DTYPE)
    P = 1 if case == "one_patch" else PATCHES
    A = (torch.randn(P, RANK, n_in, generator=gen, device=DEVICE) * n_in**-0.5).to(DTYPE)
    B = (torch.randn(P, n_out, RANK, generator=gen, device=DEVICE) * 0.1).to(DTYPE)
    slots = torch.randint(0, P, (T,), generator=gen, device=DEVICE)
    if provider == "base":
        def fn():
            return lin(x)
    elif provider == "peft-style":
        def fn():
            return lin(x) + ((x @ A[0].t()) @ B[0].t()) * 2.0
    elif provider == "peft-loop":
        masks = [(slots == p).to(DTYPE)[:, None] for p in range(P)]

        def fn():
            y = lin(x)
            for p in range(P):
                y = y + (((x * masks[p]) @ A[p].t()) @ B[p].t()) * 2.0
            return y
    else:
        layer = PatchedLinear(lin, PATCHES, RANK)
        for p in range(P):
            layer.set_slot(p, B[p], A[p], 2.0)
        layer.backend = provider.removeprefix("serve-")
        layer.routing.set(slots, None)

        def fn():
            return layer(x)
    run_fn, base_fn = fn, (lambda: lin(x))
    if graph:
        run_fn, base_fn = _graphed(fn), _graphed(base_fn)
        if run_fn is None:
            pytest.skip(f"{provider} cannot be captured in a CUDA graph")
    # Paired timing: before each timed round of the provider, one untimed-by-pytest round of the
    # base GEMM, timed here; the ratio of the two medians is immune to the machine drifting between
    # tests (on a shared 2-core CPU, tests minutes apart differ by 30%).
    base_times, prov_times = [], []

    def setup():
        sync()
        t0 = time.perf_counter()
        base_fn()
        sync()
        base_times.append(time.perf_counter() - t0)

    def call():
        t0 = time.perf_counter()
        run_fn()
        sync()
        prov_times.append(time.perf_counter() - t0)

    with torch.no_grad():
        call()
        setup()
        base_times.clear()
        prov_times.clear()
        info = dict(op="serve_layer", case=case, n_in=n_in, n_out=n_out, T=T, r=RANK, dtype="bfloat16",
                    provider=provider, graph=graph, bytes=(n_in * n_out + T * (n_in + n_out)) * 2)
        benchmark.group = f"serve layer {n_in}x{n_out} T={T}"
        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, iterations=1)
    info["paired_base_ms"] = round(statistics.median(base_times) * 1e3, 4)
    info["time_vs_base"] = round(statistics.median(prov_times) / statistics.median(base_times), 3)
    benchmark.extra_info.update(info)


# ---------------------------------------------------------------------------------------------


def _decode_config():
    from transformers import LlamaConfig

    if QUICK:
        kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)
    elif DEVICE.type == "cuda":  # 1.1B Llama-shaped (TinyLlama)
        kw = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000)
    else:
        kw = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000)
    return LlamaConfig(max_position_embeddings=256, **kw)


DECODE_BATCH, PROMPT, NEW = (4, 8, 4) if QUICK else (32, 32, 32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_decode_config()).to(device=DEVICE, dtype=DTYPE).eval()
    model.generation_config.eos_token_id = None  # always NEW tokens
    return model


def _patches(model):
    from portllm.patch import Patch, PatchModule

    out = {}
    g = torch.Generator().manual_seed(1)
    for i in range(PATCHES):
        mods = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                mods[name] = PatchModule((torch.randn(mod.out_features, RANK, generator=g) * 0.01).to(DTYPE),
                                         (torch.randn(RANK, mod.in_features, generator=g) * 0.01).to(DTYPE), 2.0)
        out[f"p{i}"] = Patch(mods)
    return out


@pytest.mark.parametrize("provider", ["base", "peft adapter_names"] + [f"portllm.serve@{b}" for b in SERVE_BACKENDS])
def test_serve_decode(benchmark, provider):
    pytest.importorskip("transformers")
    model = _base_model()
    ids = torch.randint(0, model.config.vocab_size, (DECODE_BATCH, PROMPT), device=DEVICE,
                        generator=torch.Generator(device=DEVICE).manual_seed(2))
    names = [f"p{i % PATCHES}" for i in range(DECODE_BATCH)]
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    if provider == "base":
        def gen():
            return model.generate(input_ids=ids, **kwargs)
    elif provider.startswith("portllm.serve@"):
        from portllm import serve

        serve.attach(model, _patches(model), max_patches=PATCHES, max_rank=RANK)
        for layer in model.modules():
            if isinstance(layer, PatchedLinear):
                layer.backend = provider.partition("@")[2]

        def gen():
            with serve.route(model, names):
                return model.generate(input_ids=ids, **kwargs)
    else:
        peft = pytest.importorskip("peft")
        cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
        model = peft.get_peft_model(model, cfg, adapter_name="p0")
        for i in range(1, PATCHES):
            model.add_adapter(f"p{i}", copy.deepcopy(cfg))
        model.to(device=DEVICE, dtype=DTYPE).eval()

        def gen():
            return model.generate(input_ids=ids, adapter_names=names, **kwargs)

    def call():
        with torch.no_grad():
            gen()
        sync()

    call()
    info = dict(op="serve_decode", provider=provider, batch=DECODE_BATCH, prompt=PROMPT, new_tokens=NEW,
                patches=PATCHES, r=RANK, layers=model.config.num_hidden_layers, hidden=model.config.hidden_size,
                dtype="bfloat16", bytes=0)
    benchmark.group = "serve decode"
    benchmark.extra_info.update(info)
    benchmark.pedantic(call, rounds=3 if DEVICE.type == "cpu" else 5, warmup_rounds=0, iterations=1)



def derive(rows: list[dict]):
    """Serving: a patched layer's time over the base GEMM's (same shape, T, eager or graph, same run);
    decoding tokens/s and its ratio to the base model's and to PEFT's."""
    base = {(r["n_in"], r["n_out"], r["T"], r["graph"]): r for r in rows
            if r["op"] == "serve_layer" and r["provider"] == "base"}
    for r in rows:
        if r["op"] == "serve_layer":
            r.pop("gbps", None)
            b = base.get((r["n_in"], r["n_out"], r["T"], r["graph"]))
            if b is not None and "time_vs_base" not in r:  # (the suite pairs each provider with the base)
                r["time_vs_base"] = round(r["median_ms"] / b["median_ms"], 3)
    dec = {r["provider"]: r for r in rows if r["op"] == "serve_decode"}
    for r in dec.values():
        r.pop("gbps", None)
        r["tokens_per_s"] = round(r["batch"] * r["new_tokens"] / (r["median_ms"] / 1e3), 1)
    for r in dec.values():
        if "base" in dec and r is not dec["base"]:
            r["vs_base"] = round(r["tokens_per_s"] / dec["base"]["tokens_per_s"], 3)
        if "peft adapter_names" in dec and r["provider"].startswith("portllm.serve"):
            r["vs_peft"] = round(r["tokens_per_s"] / dec["peft adapter_names"]["tokens_per_s"], 3)


def table(rows: list[dict]) -> list[str]:
    out = []
    serve = [r for r in rows if r["op"] == "serve_layer"]
    if serve:
        out.append(f"{'serve layer (bf16, r=16)':<30} {'T':>5} {'case':<12} {'provider':<18} {'graph':>5} "
                   f"{'median ms':>10} {'x base':>7}")
        for r in serve:
            out.append(f"{str(r['n_in']) + 'x' + str(r['n_out']):<30} {r['T']:>5} {r['case']:<12} {r['provider']:<18} "
                       f"{str(r['graph']):>5} {r['median_ms']:>10.3f} {fmt(r.get('time_vs_base')):>7}")
    for r in rows:
        if r["op"] == "serve_decode":
            out.append(f"decode {r['provider']:<22} {r['tokens_per_s']:>9.1f} tok/s  x base {r.get('vs_base', 1.0):.2f}  "
                       f"x peft {fmt(r.get('vs_peft'))}")
    return out


SUITE = Suite("serve", frozenset({"serve_layer", "serve_decode"}), derive, table)
