"""Every CUDA source compiles with nvcc for sm_80 and sm_90a, on machines with no GPU too."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from check_cuda import find_nvcc  # noqa: E402


@pytest.mark.slow
def test_cuda_sources_compile():
    if find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_cuda.py")],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok" in res.stdout
