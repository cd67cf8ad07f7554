"""Compile-checks every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a, against the installed
torch's headers. Needs no GPU and no CUDA build of torch: the kernel inspection (python -m portllm.inspection)
compiles the same way, and is what CI runs.

Usage: python tools/check_cuda.py [--nvcc PATH] [FILES...]   (exit 0: all compiled)
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from portllm.inspection.cuda import ARCHS, find_nvcc, nvcc_command  # noqa: E402  (one command for both)


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
