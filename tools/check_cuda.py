"""Compile-checks every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a, against the installed
torch's headers. Needs no GPU and no CUDA build of torch: this is what CI runs on CPU machines.

Usage: python tools/check_cuda.py [--nvcc PATH] [FILES...]   (exit 0: all compiled)
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90a")


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(cuda_home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=None)
    ap.add_argument("files", nargs="*")
    a = ap.parse_args(argv)
    nvcc = a.nvcc or find_nvcc()
    if nvcc is None:
        print("check_cuda: nvcc not found (set CUDA_HOME); nothing checked", file=sys.stderr)
        return 2
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in files:
            t0 = time.time()
            res = subprocess.run(nvcc_command(nvcc, src, os.path.join(tmp, "out.o")),
                                 capture_output=True, text=True)
            status = "ok" if res.returncode == 0 else "FAILED"
            print(f"check_cuda: {os.path.relpath(src, ROOT)} sm_{', sm_'.join(ARCHS)}: {status} "
                  f"({time.time() - t0:.0f} s)")
            if res.returncode != 0:
                failed.append(src)
                print(res.stdout + res.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
