"""The issues' speed targets as data: each goal names the rows it reads (field values), the metric,
how several rows reduce to one value, and the comparison. ``evaluate(rows, device)`` gives, per goal,
the value measured in this run, or None (not measured: the goal's device or rows are absent).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

_OPS = {">=": operator.ge, "<=": operator.le}
_AGG = {"min": min, "max": max, "first": lambda v: v[0]}


@dataclass(frozen=True)
class Goal:
    name: str
    device: str  # "cpu" or "cuda"
    where: dict  # row fields that must match
    metric: str  # row field measured
    compare: str  # ">=" or "<="
    goal: float
    agg: str = "first"  # how several matching rows reduce: min, max, first
    scale: float = 1.0  # the metric times this is compared (bytes -> MiB, ms -> s)
    exclude: dict = field(default_factory=dict)  # row fields that must not match


_BF16 = dict(op="patch_add_", case="single", dtype="bfloat16")
GOALS: list[Goal] = [
    # mixture-of-experts merge (#19), CPU: the batched expert merge against the fastest pass over the same bytes
    *[Goal(f"CPU expert merge {E}x{m}x{n} bf16 r=16 (patch_add_experts_, cpp): fraction of the fastest pass", "cpu",
           dict(op="patch_add_experts_", E=E, m=m, n=n, provider="portllm-cpp"), "fraction_of_fastest_pass", ">=", 0.9)
      for E, m, n in ((128, 768, 2048), (8, 14336, 4096))],
    Goal("FP8 merge (4096x14336 e4m3, r=16, nearest) on CPU: fraction of an in-place pass over the FP8 weight", "cpu",
         dict(op="fp8_merge", provider="fp8_merge-cpp", case="nearest", isa="avx512bf16"), "fraction_of_inplace_pass",
         ">=", 0.8),
    # MXFP4 (#30), CPU
    Goal("MXFP4 merge (5760x2880 expert, r=16, nearest) on CPU: fraction of an in-place pass over its packed bytes",
         "cpu", dict(op="mxfp4_merge", provider="mxfp4_merge-cpp", case="nearest", isa="avx512bf16"),
         "fraction_of_inplace_pass", ">=", 0.8),
    Goal("MXFP4 port (GPT-OSS-shaped, 1.7 GB), whole command: time / (cp -r + sync)", "cpu",
         dict(op="port_mxfp4", provider="portllm port"), "time_vs_copy", "<=", 1.5),
    Goal("MXFP4 port, whole command: peak RSS (MiB)", "cpu", dict(op="port_mxfp4", provider="portllm port"),
         "peak_rss", "<=", 300, scale=1 / 2**20),
    Goal("MoE port (Qwen3-MoE-shaped, 1.4 GB), whole command: time / (cp -r + sync)", "cpu",
         dict(op="port_moe", provider="portllm port"), "time_vs_copy", "<=", 1.5),
    Goal("MoE port, whole command: peak RSS (MiB)", "cpu", dict(op="port_moe", provider="portllm port"),
         "peak_rss", "<=", 300, scale=1 / 2**20),
    # foundation (#2), CPU
    Goal("CPU bf16 4096x14336 r=16, default cpp path: speed vs torch.addmm_", "cpu",
         dict(_BF16, m=4096, n=14336, r=16, factor_dtype="bfloat16", provider="portllm-cpp", isa="avx512bf16"),
         "speedup_vs_addmm_", ">=", 1.8),
    Goal("four rank-16 patches in one pass (cpp) vs four addmm_ calls", "cpu",
         dict(case="four_rank16_patches", provider="portllm-cpp one pass"), "speedup_vs_addmm_", ">=", 3.0),
    # AVX2 path (#12): within 1.3x of max(fastest pass over W, FMA floor) at r = 8, 16; 1.5x at r = 64
    *[Goal(f"CPU avx2 path, 4096x14336 r={r}, {fd} factors: time / max(fastest pass over W, FMA floor)", "cpu",
           dict(_BF16, m=4096, n=14336, r=r, factor_dtype=fd, provider="portllm-cpp", isa="avx2"),
           "time_vs_limit", "<=", 1.3 if r <= 16 else 1.5)
      for r in (8, 16, 64) for fd in ("bfloat16", "float32")],
    *[Goal(f"CPU {isa} path: slowest speed vs the reference (every case)", "cpu",
           dict(op="patch_add_", case="single", provider="portllm-cpp", isa=isa), "speedup_vs_reference", ">=", 1.0,
           agg="min") for isa in ("avx512bf16", "avx512", "avx2")],
    # GPU (#11): the merge at the bandwidth limit
    *[Goal(f"GPU {be}, bf16 factors: worst fraction of copy bandwidth", "cuda",
           dict(_BF16, factor_dtype="bfloat16", provider=be), "fraction_of_copy_bandwidth", ">=", 0.95, agg="min")
      for be in ("portllm-triton", "portllm-cuda")],
    *[Goal(f"GPU {be}, fp32 factors, r<=16: worst fraction of copy bandwidth", "cuda",
           dict(_BF16, factor_dtype="float32", provider=be), "fraction_of_copy_bandwidth", ">=", 0.90, agg="min",
           exclude=dict(r=64)) for be in ("portllm-triton", "portllm-cuda")],
    *[Goal(f"GPU {be}, fp32 factors, r=64: worst fraction of copy bandwidth", "cuda",
           dict(_BF16, factor_dtype="float32", r=64, provider=be), "fraction_of_copy_bandwidth", ">=", 0.85, agg="min")
      for be in ("portllm-triton", "portllm-cuda")],
    *[Goal(f"GPU {be}: worst speed vs torch.addmm_", "cuda", dict(_BF16, factor_dtype="bfloat16", provider=be),
           "speedup_vs_addmm_", ">=", 1.45, agg="min") for be in ("portllm-triton", "portllm-cuda")],
    *[Goal(f"GPU {be}: four rank-16 patches in one pass vs four addmm_", "cuda",
           dict(case="four_rank16_patches", provider=f"{be} one pass"), "speedup_vs_addmm_", ">=", 3.0)
      for be in ("portllm-triton", "portllm-cuda")],
    *[Goal(f"GPU {be}: worst extra peak memory beyond the factors (MiB)", "cuda",
           dict(_BF16, provider=be), "extra_beyond_factors", "<=", 1.0, agg="max", scale=2**-20)
      for be in ("portllm-triton", "portllm-cuda")],
    # port at copy speed (#27), CPU: medians of three interleaved rounds, same run
    *[Goal(f"port {size}, the job (its report): time / copy+fsync", "cpu",
           dict(op="port", size=size, provider="portllm port (job)"), "time_vs_copy", "<=", 1.25)
      for size in ("1GB", "4GB")],
    Goal("port 4GB, the whole command: time / copy+fsync", "cpu",
         dict(op="port", size="4GB", provider="portllm port (command)"), "time_vs_copy", "<=", 1.5),
    *[Goal(f"port {size}: peak RSS above the interpreter's own (MiB)", "cpu",
           dict(op="port", size=size, provider="portllm port (job)"), "peak_rss_above_baseline", "<=", 300,
           scale=2**-20) for size in ("1GB", "4GB")],
    Goal("port 1GB: speed vs PEFT load + merge_and_unload + save", "cpu",
         dict(op="port", size="1GB", provider="portllm port (job)"), "speedup_vs_peft", ">=", 3),
    Goal("port 1GB: PEFT's peak RSS / the port's", "cpu",
         dict(op="port", size="1GB", provider="portllm port (job)"), "peft_memory_vs_this", ">=", 4),
    # PMSS (#4, #11)
    Goal("PMSSLinear fwd+bwd, best portllm variant: time / PEFT LoRA r=8 (CPU goal 1.15)", "cpu",
         dict(op="pmss_layer"), "time_vs_lora", "<=", 1.15, agg="min", exclude=dict(provider="peft-lora-r8")),
    Goal("PMSSLinear fwd+bwd 4096x4096 bf16 8192 tokens r=256, best variant: time / PEFT LoRA r=8", "cuda",
         dict(op="pmss_layer"), "time_vs_lora", "<=", 0.90, agg="min", exclude=dict(provider="peft-lora-r8")),
    Goal("PMSSLinear: speed vs dense CUR", "cpu", dict(op="pmss_layer"), "speedup_vs_dense_cur", ">=", 5, agg="max"),
    # training step (#11)
    *[Goal(f"train step {size}: PMSS r=256 tokens/s / PEFT LoRA r=8", "cuda",
           dict(op="train_step", model=size, provider="pmss-r256"), "tokens_per_s_vs_lora", ">=", goal)
      for size, goal in (("1.1B", 1.45), ("7B", 1.10))],
    *[Goal(f"train step {size}: PMSS r=256 peak GPU memory / PEFT LoRA r=8", "cuda",
           dict(op="train_step", model=size, provider="pmss-r256"), "memory_vs_lora", "<=", goal)
      for size, goal in (("1.1B", 0.60), ("7B", 0.75))],
    *[Goal(f"pmss.inject(rank=256, method='deim') of the whole {size}-shaped model (s)", "cuda",
           dict(op="train_step", model=size, provider="pmss-r256"), "inject_seconds", "<=", goal)
      for size, goal in (("1.1B", 3.0), ("7B", 10.0))],
    # serving (#13)
    *[Goal(f"serve one patch r=16, {sh}, T={T}: PatchedLinear ({be}) / base GEMM" + (" (CUDA graphs)" if g else ""),
           "cuda", dict(op="serve_layer", case="one_patch", n_in=4096, n_out=n_out, T=T, provider=be, graph=g),
           "time_vs_base", "<=", 1.10)
      for be in ("serve-triton", "serve-cuda") for n_out, sh in ((4096, "4096x4096"), (14336, "4096x14336"))
      for T in (1, 8, 32, 128, 512, 2048) for g in ((True,) if T <= 32 else (False,))],
    *[Goal(f"serve eight patches mixed, T{'>=' if big else '<'}32: worst PatchedLinear ({be}) / base GEMM", "cuda",
           dict(op="serve_layer", case="eight_mixed", provider=be, graph=not big), "time_vs_base", "<=",
           1.5 if big else 1.3, agg="max", exclude=dict(T=32) if not big else {})
      for be in ("serve-triton", "serve-cuda") for big in (True, False)],
    Goal("decode 1.1B, batch 32, 8 patches mixed, best backend: tokens/s vs the base model", "cuda",
         dict(op="serve_decode"), "vs_base", ">=", 0.85, agg="max",
         exclude=dict(provider="peft adapter_names")),
    Goal("decode 1.1B, batch 32, 8 patches mixed, best backend: tokens/s vs PEFT adapter_names", "cuda",
         dict(op="serve_decode"), "vs_peft", ">=", 5.0, agg="max"),
    *[Goal("exact undo: side information at a 2% delta (bits per weight)", dev,
           dict(op="exact_undo", provider="remove exact"), "bits_per_weight", "<=", 1.0) for dev in ("cpu", "cuda")],
    *[Goal("exact undo: time of the undo / time of the exact merge", dev,
           dict(op="exact_undo", provider="remove exact"), "time_vs_exact_merge", "<=", 1.0) for dev in ("cpu", "cuda")],
    Goal("skeleton selection (DEIM) of one 7B layer, 7 projections, r=256, on the GPU (s; x32 <= 10 s)", "cuda",
         dict(op="pmss_select", provider="deim"), "median_ms", "<=", 10 / 32, scale=1e-3),
]


def _match(row: dict, where: dict) -> bool:
    return all(row.get(k) == v for k, v in where.items())


def evaluate(rows: list[dict], device: str) -> list[dict]:
    for r in rows:  # derived metrics some goals read
        if r.get("extra_peak_bytes") is not None and r.get("factor_bytes") is not None:
            r.setdefault("extra_beyond_factors", r["extra_peak_bytes"] - r["factor_bytes"])
    out = []
    for g in GOALS:
        if g.device != device:
            continue
        vals = [r[g.metric] * g.scale for r in rows if _match(r, g.where) and g.metric in r
                and r[g.metric] is not None and not (g.exclude and _match(r, g.exclude))]
        value = round(_AGG[g.agg](vals), 4) if vals else None
        out.append({"target": g.name, "value": value, "goal": f"{g.compare} {g.goal:g}",
                    "met": None if value is None else bool(_OPS[g.compare](value, g.goal))})
    return out
