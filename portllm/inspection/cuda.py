"""Compiling the CUDA sources (csrc/cuda/*.cu) for sm_80 and sm_90a on a machine without a GPU: nvcc,
device and host code against the installed torch's headers (no CUDA build of torch needed: the shim in
tools/cuda_shim stands in for its one generated header), one object per source holding a cubin per
architecture, counted per kernel by ``sass.stats_by_function``. The counts are cached by a hash of
every CUDA source and header, nvcc's version, torch's version and the counting code; a source that
does not compile is an error that names it (this is also the project's nvcc compile check)."""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sysconfig
import tempfile

from portllm.inspection import build, sass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ("80", "90a")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(cuda_home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def unavailable() -> str | None:
    """Why the CUDA sources cannot be compiled here, or None."""
    if not sources():
        return f"no CUDA sources under {os.path.join(ROOT, 'csrc', 'cuda')} (an installed wheel carries none)"
    if find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME)"
    return None


def nvcc_command(nvcc: str, src: str, out: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    cmd = [nvcc, "-c", src, "-o", out, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
           "-DPORTLLM_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", "-Xcompiler", "-fPIC",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "-I", os.path.join(ROOT, "csrc"), "-I", sysconfig.get_paths()["include"]]
    for p in include_paths():
        cmd += ["-I", p]
    # Last, so a CUDA torch's own generated header wins (see the shim's comment).
    cmd += ["-I", os.path.join(ROOT, "tools", "cuda_shim")]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return cmd


def _key(src: str, nvcc: str) -> str:
    import torch

    h = hashlib.sha256()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(json.dumps([version, torch.__version__, os.path.basename(src), ARCHS]).encode())
    h.update(inspect.getsource(sass).encode())
    for path in [src] + sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True)
                             + glob.glob(os.path.join(ROOT, "csrc", "*.h"))):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:32]


def compile_stats(src: str, tool: str, cache: str) -> dict:
    """{arch: {mangled kernel name: stats}} of one CUDA source; raises RuntimeError with nvcc's
    message where it does not compile."""
    nvcc = find_nvcc()
    path = os.path.join(cache, f"cuda-{_key(src, nvcc)}.json")
    hit = build.cached(path)
    if hit is not None:
        return hit
    with tempfile.TemporaryDirectory() as tmp:
        obj = os.path.join(tmp, "k.o")
        res = subprocess.run(nvcc_command(nvcc, src, obj), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {os.path.relpath(src, ROOT)}: {(res.stdout + res.stderr)[-2000:]}")
        out = sass.stats_by_function(obj, tool)
    build.store(path, out)
    return out
