"""csrc/cuda built as C++ on the CPU emulation of csrc/emu/cuda_emu.h, loaded as torch.ops.portllm_emu:
every CUDA kernel run against the reference on a machine without a GPU. Built once per source change
(torch's extension builder with ninja, in the inspection cache), about a minute on two cores."""

from __future__ import annotations

import os

import torch

from portllm.inspection import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["ops.cpp", "selftest.cpp", "patch_add.cpp", "lora_shrink.cpp", "lora_expand.cpp", "skeleton_mm.cpp"]
FLAGS = ["-O2", "-std=c++17", "-DPORTLLM_CUDA_EMULATE", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]

_loaded = None


def ops():
    """torch.ops.portllm_emu, built and loaded on first use."""
    global _loaded
    if _loaded is None:
        from torch.utils import cpp_extension

        where = os.path.join(build.cache_dir(), "cuda_emu")
        try:
            os.makedirs(where, exist_ok=True)
            writable = os.access(where, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only cache costs a build, nothing more
            import tempfile

            where = tempfile.mkdtemp(prefix="portllm-cuda-emu-")
        srcs = [os.path.join(ROOT, "csrc", "emu", s) for s in SOURCES] + [os.path.join(ROOT, "csrc", "checks.cpp")]
        cpp_extension.load(name="portllm_cuda_emu", sources=srcs, extra_cflags=FLAGS,
                           extra_include_paths=[os.path.join(ROOT, "csrc")], build_directory=where,
                           is_python_module=False, verbose=False)
        _loaded = torch.ops.portllm_emu
    return _loaded
