"""Builds portllm and its one extension, ``portllm._C``.

* C++ CPU kernels are always built (OpenMP through ATen's ``at::parallel_for``).
* CUDA kernels are added when torch was built with CUDA and ``nvcc`` is found (``CUDA_HOME``).
* A failed or impossible extension build is a warning, never an install failure: the library then
  runs on its reference backend and says so once at import.

Triton kernels live in the top-level ``kernels/`` folder and are the package ``portllm.kernels``:
``portllm/kernels`` is a relative link to that folder, so a source tree, an editable install and a
wheel all lay it out the same way. ``kernels/`` has no ``__init__.py`` and is never a top-level import
name: Hugging Face's ``kernels`` distribution, which transformers imports, owns that name.
Set ``PORTLLM_NO_EXTENSION=1`` to skip the extension, ``PORTLLM_NO_CUDA=1`` to build it CPU-only.
"""

import glob
import os
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["portllm", "portllm.pmss", "portllm.serve", "portllm.experiment", "portllm.kernels"]
PACKAGE_DIR = {"portllm": "portllm"}


def _warn(msg):
    # setuptools hides warnings.warn in some pip modes; print as well so the user sees it.
    print(f"WARNING (portllm setup): {msg}", file=sys.stderr)
    warnings.warn(msg)


def _extensions():
    if os.environ.get("PORTLLM_NO_EXTENSION") == "1":
        _warn("PORTLLM_NO_EXTENSION=1: not building portllm._C; the reference backend will be used.")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch missing from the build environment
        _warn(f"torch is not importable at build time ({e}); not building portllm._C. "
              "Install torch first and build with `pip install --no-build-isolation -e .`.")
        return [], {}

    class SafeBuildExtension(BuildExtension):
        """BuildExtension whose failure is a warning: the package still installs."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                _warn(f"building portllm._C failed ({type(e).__name__}: {e}); "
                      "portllm will run on its reference backend.")

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("PORTLLM_NO_CUDA") != "1")
    if not with_cuda:
        why = ("PORTLLM_NO_CUDA=1" if os.environ.get("PORTLLM_NO_CUDA") == "1"
               else "torch has no CUDA" if torch.version.cuda is None else "nvcc/CUDA_HOME not found")
        _warn(f"building portllm._C without CUDA kernels ({why}); CPU kernels only.")
    cxx = ["-O3", "-fopenmp", "-DPORTLLM_WITH_OPENMP"]
    define_macros = [("PORTLLM_WITH_CUDA", "1")] if with_cuda else []
    kwargs = dict(
        name="portllm._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                      "-lineinfo"]},
            **kwargs,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
