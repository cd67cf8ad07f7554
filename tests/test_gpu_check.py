"""`make gpu-check`'s plumbing on a machine without a GPU: the dry run names every step and finds every
file and suite they name; the real run refuses where there is no CUDA device."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_dry_run_names_every_step_and_finds_what_they_name():
    r = _run("--dry-run")
    assert r.returncode == 0, r.stderr
    for step in ("build", "cuda tests", "bench patch_add", "bench pmss", "bench fp8", "bench serve", "defaults"):
        assert f"gpu-check step '{step}'" in r.stdout
    assert "dry run ok" in r.stdout


def test_dry_run_fails_on_a_missing_test_file(monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "CUDA_TESTS", gpu_check.CUDA_TESTS + ["tests/test_no_such_file.py"])
    assert gpu_check.main(["--dry-run"]) == 1


def test_real_run_refuses_without_a_gpu():
    if torch.cuda.is_available():
        return  # (on the GPU machine the real run is `make gpu-check` itself)
    r = _run()
    assert r.returncode == 2 and "no CUDA device here" in r.stderr
