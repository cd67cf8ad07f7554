"""Every hot-path Triton kernel configuration, as its launcher launches it, and what its design
intends. Shapes are a 7B model's (W 4096 × 14336; 4096 features), tokens T ∈ {16, 512}, ranks r ∈ {16,
64}; the block sizes, warps and stages come from each launcher's ``launch_meta``, so what is inspected
is what runs.

A design's checks (``checks.CHECKS``): ``tensor_cores`` (it multiplies on them), ``wgmma`` (on sm_90a,
with Hopper's warpgroup MMA: a design whose tiles have 64 rows or more), ``no_spills``,
``w_128bit`` (its streamed operand loaded and stored 128 bits per thread), ``factor_loads`` (no
scalar 16-bit or 8-bit loads of the factors: vectorized or cp.async), ``registers`` (at least
``ctas`` blocks of its threads fit an SM's 64K registers). ``faults``: a check it fails today, with
why (issue #23, item 2), per architecture ("sm_80", "sm_90a") or for both ("*").
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Design:
    name: str
    module: str  # portllm.kernels.<module>
    kernel: str  # the @triton.jit function's name in it
    args: tuple  # dtype names stand for tensors of that dtype
    meta: dict
    checks: tuple
    ctas: int = 2  # intended resident blocks per SM (the registers check)
    faults: dict = field(default_factory=dict)  # "check@arch" or "check@*" -> why it fails today
    lang: str = "triton"  # or "cuda": module is then a file of csrc/cuda, kernel a regex of its mangled name
    threads: int = 0  # CUDA: threads per block, as its launcher launches it

    def fault(self, check: str, arch: str) -> str | None:
        return self.faults.get(f"{check}@{arch}") or self.faults.get(f"{check}@*")


ARCHS = {90: "sm_90a", 80: "sm_80"}
M, N, FEATURES = 4096, 14336, 4096


def _patch_add() -> list[Design]:
    from portllm.kernels import patch_add as pa

    out = []
    for r in (16, 64):
        for mode, label, wdt, fdt, ng in ((pa.MODE_HALF, "bf16 W, bf16 factors", "bfloat16", "bfloat16", 1),
                                          (pa.MODE_HALF, "bf16 W, bf16 factors, 4 scale groups", "bfloat16",
                                           "bfloat16", 4),
                                          (pa.MODE_SPLIT, "bf16 W, fp32 factors", "bfloat16", "bfloat16", 0),
                                          (pa.MODE_FP32, "fp32 W, fp32 factors", "float32", "float32", 0)):
            if ng == 4 and r == 16:
                continue
            sdt = "int32" if mode == pa.MODE_HALF else "float32"
            args = (wdt, fdt, fdt, fdt, fdt, "float32", sdt, "float32", M, N, r, ng, N, 1, r, 1, N, 1)
            tc = ("tensor_cores", "wgmma") if mode != pa.MODE_FP32 else ()
            out.append(Design(f"patch_add_ {label}, r={r}", "patch_add", "_patch_add_kernel", args,
                              dict(pa.launch_meta(r, mode, max(ng, 1)), MODE=mode, UPCAST=False, SOFT_RNE=False),
                              tc + ("no_spills", "w_128bit", "factor_loads", "registers")))
    return out


def _serving() -> list[Design]:
    from portllm.kernels import lora_expand as le
    from portllm.kernels import lora_shrink as ls

    out, P = [], 8
    for T, r in ((16, 16), (16, 64), (512, 16)):
        out.append(Design(f"lora_shrink bf16, T={T}, r={r}", "lora_shrink", "_lora_shrink_kernel",
                          ("bfloat16", "bfloat16", "float32") + ("int64",) * 4
                          + (FEATURES, r, P, FEATURES, 1, r * FEATURES, FEATURES, 1, r),
                          dict(ls.launch_meta(T, r, P), UPCAST=False),
                          ("tensor_cores", "no_spills", "factor_loads", "registers")))
        out.append(Design(f"lora_expand_ bf16, T={T}, r={r}", "lora_expand", "_lora_expand_kernel",
                          ("bfloat16", "float32", "bfloat16", "float32") + ("int64",) * 4
                          + (FEATURES, r, P, FEATURES, 1, r, r * FEATURES, 1, FEATURES),
                          dict(le.launch_meta(T, r, P), SPLIT_H=True, UPCAST=False),
                          ("tensor_cores", "no_spills", "factor_loads", "registers")))
    return out


def _skeleton() -> list[Design]:
    """The three PMSS products on a row-major 4096 × 4096 W, rank 256, T = 8192 tokens. Kind ``r`` reads
    whole rows of W: its tile is contiguous along the output and must load in vectors; kinds ``c`` and
    ``ct`` gather columns, contiguous along neither tile dimension: scalar loads by design."""
    from portllm.kernels import skeleton_mm as sk

    T, m, r = 8192, 4096, 256
    out = []
    for kind, K, Nn, gather, strides, aligned in (("r", r, m, (True, False), (0, 1), True),
                                                   ("c", m, r, (False, True), (m, 0), False),
                                                   ("ct", r, m, (True, False), (0, m), False)):
        checks = ("tensor_cores", "no_spills", "registers") + (("factor_loads",) if kind == "r" else ())
        out.append(Design(f"skeleton_mm bf16, kind {kind}, T={T}, K={K}, N={Nn}", "skeleton_mm", "_skeleton_mm_kernel",
                          ("bfloat16", "bfloat16", "int64", "int64", "bfloat16", T, K, Nn, K, 1, Nn, 1) + strides,
                          dict(sk.LAUNCH, DOT_FP32=False, ROW_GATHER=gather[0], COL_GATHER=gather[1], ALIGNED=aligned),
                          checks))
    return out


def _fp8_merge() -> list[Design]:
    from portllm.kernels import fp8_merge as fm

    out = []
    for r, stochastic in ((16, False), (16, True), (64, False)):
        out.append(Design(f"fp8_merge 128x128 blocks, r={r}, {'stochastic' if stochastic else 'nearest'}",
                          "fp8_merge", "_fp8_merge_kernel",
                          ("uint8", "float32", "float32", "float32", "uint8", "float32", "float64",
                           M, N, r, 128, 128, N // 128, 1234, 5678),
                          dict(fm.launch_meta(128, 128), STOCHASTIC=stochastic), ("no_spills", "registers")))
    return out


def _cuda() -> list[Design]:
    """The CUDA kernels for a bf16 W (and fp32 W for the fallback), as csrc/cuda's launchers launch them
    where the data's layout allows 16-byte accesses (the instances with VEC template arguments; other
    layouts take element-wise instances, which are tested but not inspected). Every CUDA kernel also
    runs on the CPU emulation against the reference (tests/test_cuda_emulated.py).
    The tensor-core merge is mma.sync by design (it is bound by W's bytes: at r=64 a merge needs 32
    FLOP per byte of W traffic, about 107 TFLOP/s at an H100's 3.35 TB/s, within mma.sync's reach),
    so wgmma is not asked of it. skeleton_mm (fp32 FMA) is never a default: cuBLAS wins by design."""
    mma = r"patch_add_mma_kernelIN3c108BFloat16E13__nv_bfloat16Lb{}ELb1EE"
    both = ("no_spills", "registers")
    return [
        Design("patch_add_ (CUDA mma) bf16 W, bf16 factors", "patch_add.cu", mma.format(0), (), {},
               ("tensor_cores", "w_128bit", "factor_loads") + both, lang="cuda", threads=256),
        Design("patch_add_ (CUDA mma) bf16 W, fp32 factors split", "patch_add.cu", mma.format(1), (), {},
               ("tensor_cores", "w_128bit", "factor_loads") + both, lang="cuda", threads=256),
        Design("patch_add_ (CUDA fallback) fp32 W, fp32 factors", "patch_add.cu", r"patch_add_kernelIffLb1EE", (), {},
               ("w_128bit",) + both, lang="cuda", threads=256),
        Design("patch_add_ (CUDA fallback) bf16 W, bf16 factors, > 16 scale groups", "patch_add.cu",
               r"patch_add_kernelIN3c108BFloat16ES3_Lb1EE", (), {}, ("w_128bit",) + both, lang="cuda", threads=256),
        Design("lora_shrink (CUDA) bf16", "lora_shrink.cu", r"lora_shrink_kernelIN3c108BFloat16ELb1EE", (), {},
               ("factor_loads",) + both, lang="cuda", threads=128),
        Design("lora_expand_ (CUDA) bf16", "lora_expand.cu", r"lora_expand_kernelIN3c108BFloat16ES3_Lb1EE", (), {},
               ("factor_loads", "w_128bit") + both, lang="cuda", threads=64),
        Design("skeleton_mm (CUDA, never a default) bf16", "skeleton_mm.cu", r"skeleton_mm_kernelIN3c108BFloat16EE",
               (), {}, ("tensor_cores",) + both, lang="cuda", threads=256,
               faults={"tensor_cores@*": "fp32 FMA by design; cuBLAS on the gathered skeleton wins (5.2 ms against "
                                         "1.3 ms on the H100), so it is never a default (tools/gen_defaults.py)"}),
    ]


def designs(lang: str | None = None) -> list[Design]:
    every = _patch_add() + _serving() + _skeleton() + _fp8_merge() + _cuda()
    return [d for d in every if lang in (None, d.lang)]
