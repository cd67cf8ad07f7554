"""PMSS, in one run:

* a layer's forward + backward, 4096×4096 bf16, r=256 (65,536 trainable parameters, as many as
  LoRA r=8): ``pmss-gemm`` (PMSSLinear's default form), ``pmss-<backend>`` (PMSSLinear through
  ``ops.skeleton_mm`` with that backend), ``peft-lora-r8`` (PEFT's LoRA layer) and
  ``dense-cur`` (C·U·R materialised each step); with the bytes of activations saved for backward;
* skeleton selection (DEIM, randomized SVD) for the seven projections of one 7B-Llama layer, r=256.

Tokens: 8192 on a GPU, 2048 on a CPU (a 2-core machine takes seconds per step at 8192).
"""

import statistics
import time

import pytest
import torch
from benchutil import DEVICE, QUICK, sync
from suite import Suite, fmt

from portllm import ops
from portllm.pmss import PMSSLinear, select_skeleton
from portllm.pmss.select import _top_singular_vectors, deim_incremental, deim_lstsq

DIM = 256 if QUICK else 4096
TOKENS = 256 if QUICK else (8192 if DEVICE.type == "cuda" else 2048)
R_PMSS, R_LORA = (32, 4) if QUICK else (256, 8)
DTYPE = torch.bfloat16
ROUNDS = 3 if QUICK else (20 if DEVICE.type == "cuda" else 5)
BACKENDS = [b for b in ops.available_backends(DEVICE, "skeleton_mm") if not (b == "triton" and DEVICE.type == "cpu")]
# pmss-gemm: the layer's default form (gathered skeleton, BLAS addmm_ into the base GEMM's output);
# pmss-<backend>: the layer through ops.skeleton_mm with that backend.
PROVIDERS = ["pmss-gemm"] + [f"pmss-{b}" for b in BACKENDS] + ["peft-lora-r8", "dense-cur"]


class DenseCUR(torch.nn.Module):
    """The naive PMSS: ΔW = s·W[:, J]·U·W[I, :] formed densely every step."""

    def __init__(self, lin, I, J, scale=1.0):
        super().__init__()
        self.lin, self.I, self.J, self.scale = lin, I, J, scale
        self.U = torch.nn.Parameter(torch.zeros(len(I), len(I), device=lin.weight.device, dtype=torch.float32))

    def forward(self, x):
        W = self.lin.weight
        dW = self.scale * (W[:, self.J] @ self.U.to(W.dtype) @ W[self.I, :])
        return x @ (W + dW).t() + self.lin.bias


def make_layer(provider):
    torch.manual_seed(0)
    lin = torch.nn.Linear(DIM, DIM).to(DEVICE, DTYPE)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    if provider == "peft-lora-r8":
        from peft import LoraConfig, get_peft_model

        holder = torch.nn.Sequential()
        holder.add_module("lin", lin)
        model = get_peft_model(holder, LoraConfig(r=R_LORA, lora_alpha=2 * R_LORA, target_modules=["lin"]))
        layer = model.base_model.model.lin
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.01)
        return layer
    I, J = select_skeleton(lin.weight, R_PMSS)
    if provider == "dense-cur":
        return DenseCUR(lin, I, J)
    return PMSSLinear(lin, I, J, backend=provider.removeprefix("pmss-"))


def saved_activation_bytes(layer, x) -> int:
    params = {p.data_ptr() for p in layer.parameters()} | {b.data_ptr() for b in layer.buffers()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params and t.data_ptr() != x.data_ptr():
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


@pytest.mark.parametrize("provider", PROVIDERS)
def test_layer_fwd_bwd(benchmark, provider):
    """Each provider timed paired with PEFT's LoRA layer (one LoRA step before each timed step, in
    the same test): ``time_vs_lora`` is the ratio of the two medians, which holds still where
    tests run minutes apart drift (on a shared CPU, by 30%)."""
    layer = make_layer(provider)
    lora = make_layer("peft-lora-r8")
    x = torch.randn(TOKENS, DIM, device=DEVICE, dtype=DTYPE, requires_grad=True)
    go = torch.randn(TOKENS, DIM, device=DEVICE, dtype=DTYPE)
    lora_times, times = [], []

    def lora_step():
        sync()
        t0 = time.perf_counter()
        lora(x).backward(go)
        sync()
        lora_times.append(time.perf_counter() - t0)

    def step():
        t0 = time.perf_counter()
        layer(x).backward(go)
        sync()
        times.append(time.perf_counter() - t0)

    step()
    lora_step()
    lora_times.clear()
    times.clear()
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    benchmark.group = f"layer fwd+bwd {DIM}x{DIM} tokens={TOKENS}"
    benchmark.pedantic(step, setup=lora_step, rounds=ROUNDS, iterations=1)
    ratio = statistics.median(times) / statistics.median(lora_times)
    benchmark.extra_info.update(op="pmss_layer", case="layer", provider=provider, m=DIM, n=DIM, tokens=TOKENS,
                                r=R_LORA if provider.startswith("peft") else R_PMSS, dtype="bfloat16",
                                trainable_params=trainable, saved_activation_bytes=saved_activation_bytes(layer, x),
                                bytes=0, time_vs_lora=round(ratio, 3), time_vs_base=round(ratio, 3))


LAYER_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
            "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


@pytest.mark.parametrize("provider", ["deim", "deim-incremental", "deim-lstsq"])
def test_select_one_7b_layer(benchmark, provider):
    """select_skeleton's DEIM (the pivots of an LU factorisation) against the forms it replaced: one
    rank-1 elimination per step, and growing least-squares solves; the same randomized SVD in front of
    each."""
    shapes = {k: (s[0] // 16, s[1] // 16) for k, s in LAYER_7B.items()} if QUICK else LAYER_7B
    r = 16 if QUICK else 256
    g = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {k: torch.randn(*s, generator=g, device=DEVICE, dtype=DTYPE) for k, s in shapes.items()}
    groups = {}
    for k, W in weights.items():
        groups.setdefault(tuple(W.shape), []).append(W)
    stacked = [torch.stack(ws) for ws in groups.values()]

    def select_all():
        for Ws in stacked:
            if provider == "deim":
                select_skeleton(Ws, r, "deim")
            else:
                U, V = _top_singular_vectors(Ws, r, 0, 4)
                pick = deim_incremental if provider == "deim-incremental" else deim_lstsq
                pick(U), pick(V)
        sync()

    benchmark.group = "select 7B layer"
    benchmark.extra_info.update(op="pmss_select", case="one_7b_layer", provider=provider, r=r, matrices=len(weights),
                                layers_in_7b=32, bytes=0, m=0, n=0)
    benchmark.pedantic(select_all, rounds=1 if not QUICK else 2, warmup_rounds=0, iterations=1)


def derive(rows: list[dict]):
    """PMSS layer: time relative to PEFT's LoRA layer and to the dense-CUR layer, in the same run."""
    layer = {r["provider"]: r for r in rows if r["op"] == "pmss_layer"}
    lora, dense = layer.get("peft-lora-r8"), layer.get("dense-cur")
    for r in layer.values():
        r.pop("gbps", None)
        if lora and r is not lora and "time_vs_lora" not in r:  # (the suite pairs each provider with LoRA)
            r["time_vs_lora"] = round(r["median_ms"] / lora["median_ms"], 3)
        if dense and r is not dense:
            r["speedup_vs_dense_cur"] = round(dense["median_ms"] / r["median_ms"], 3)
    for r in rows:
        if r["op"] == "pmss_select":
            r.pop("gbps", None)


def table(rows: list[dict]) -> list[str]:
    out = []
    layers = [r for r in rows if r["op"] == "pmss_layer"]
    if layers:
        out.append(f"{'PMSS layer fwd+bwd':<24} {'median ms':>10} {'trainable':>10} {'saved MiB':>10} {'x LoRA':>7} "
                   f"{'dense/this':>10}")
        for r in layers:
            out.append(f"{r['provider']:<24} {r['median_ms']:>10.2f} {r['trainable_params']:>10} "
                       f"{r['saved_activation_bytes'] / 2**20:>10.2f} {fmt(r.get('time_vs_lora')):>7} "
                       f"{fmt(r.get('speedup_vs_dense_cur')):>10}")
    for r in rows:
        if r["op"] == "pmss_select":
            out.append(f"select_skeleton ({r['provider']}, r={r['r']}), one 7B layer's 7 projections: "
                       f"{r['median_ms'] / 1e3:.2f} s")
    return out


SUITE = Suite("pmss", frozenset({"pmss_layer", "pmss_select"}), derive, table)
