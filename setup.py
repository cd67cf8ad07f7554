"""Builds portllm and its one extension, ``portllm._C``.

* C++ CPU kernels are always built (OpenMP through ATen's ``at::parallel_for``).
* CUDA kernels are added when torch was built with CUDA and a CUDA toolkit is found: ``CUDA_HOME``
  (or ``CUDA_PATH``), else the toolkit of the ``nvcc`` on PATH, asked of nvcc itself (``nvcc
  --dryrun`` prints its ``TOP``), so that a wrapper script on PATH (``/usr/local/bin/nvcc`` that
  execs the real one) does not make ``/usr/local`` the toolkit. A toolkit counts only with
  ``bin/nvcc``, ``include/cuda_runtime.h`` and ``libcudart``.
* If the CUDA part cannot be built or linked, the CPU part is built on its own, with a warning
  that says why. If nothing can be built, the install still succeeds, with a warning: the library
  then runs on its reference backend. Either way ``portllm/_build.json`` records what was built
  and why not, and portllm says it at import and in ``portllm info`` (pip hides build warnings).

Triton kernels live in the top-level ``kernels/`` folder and are the package ``portllm.kernels``:
``portllm/kernels`` is a relative link to that folder, so a source tree, an editable install and a
wheel all lay it out the same way. ``kernels/`` has no ``__init__.py`` and is never a top-level import
name: Hugging Face's ``kernels`` distribution, which transformers imports, owns that name.

Set ``PORTLLM_NO_EXTENSION=1`` to skip the extension, ``PORTLLM_NO_CUDA=1`` to build it CPU-only.
``PORTLLM_FORCE_CUDA=1`` attempts the CUDA part even with a torch without CUDA (it then fails, and
the CPU fallback runs: how the tests exercise that path on machines without a CUDA torch).
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["portllm", "portllm.ops", "portllm.pmss", "portllm.serve", "portllm.experiment", "portllm.kernels",
            "portllm.inspection"]
PACKAGE_DIR = {"portllm": "portllm"}
BUILD_REPORT = "_build.json"  # beside portllm/_C*.so: what was built, and why not


def _warn(msg):
    # setuptools hides warnings.warn in some pip modes; print as well so the user sees it.
    print(f"WARNING (portllm setup): {msg}", file=sys.stderr)
    warnings.warn(msg)


def _toolkit_problem(home):
    """None if ``home`` is a CUDA toolkit that can build and link the kernels, else what it lacks."""
    # The layouts torch's builder accepts: NVIDIA's (lib64), Debian's (/usr, lib/<triplet>), conda's (targets/*).
    need = {"bin/nvcc": [os.path.join(home, "bin", "nvcc")],
            "include/cuda_runtime.h": ([os.path.join(home, "include", "cuda_runtime.h")]
                                       + glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))),
            "libcudart": (glob.glob(os.path.join(home, "lib64", "libcudart.so*"))
                          + glob.glob(os.path.join(home, "lib", "libcudart.so*"))
                          + glob.glob(os.path.join(home, "lib", "*", "libcudart.so*"))
                          + glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart.so*")))}
    missing = [what for what, paths in need.items() if not any(os.path.exists(p) for p in paths)]
    return f"{home} has no {', '.join(missing)}" if missing else None


def find_cuda_home(environ=None, which=shutil.which, run=subprocess.run):
    """(the CUDA toolkit directory or None, how it was found or why none was)."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            problem = _toolkit_problem(environ[var])
            return (None, f"{var}={environ[var]}, but {problem}") if problem else (environ[var], f"{var}")
    nvcc = which("nvcc")
    if nvcc is None:
        if _toolkit_problem("/usr/local/cuda") is None:
            return "/usr/local/cuda", "/usr/local/cuda"
        return None, "no nvcc on PATH and no CUDA_HOME"
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # a wrapper script on PATH: nvcc itself says where its toolkit is
        res = run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                  capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).splitlines():
            m = re.match(r"#\$ TOP=(.+)$", line.strip())
            if m:
                candidates.insert(0, os.path.realpath(m.group(1)))
    except (OSError, subprocess.SubprocessError):
        pass
    for home in dict.fromkeys(candidates):
        if _toolkit_problem(home) is None:
            return home, f"the toolkit of {nvcc}"
    return None, (f"nvcc on PATH is {nvcc}, but no CUDA toolkit was found for it ("
                  + "; ".join(_toolkit_problem(h) for h in dict.fromkeys(candidates)) + "): set CUDA_HOME")


def _extensions():
    if os.environ.get("PORTLLM_NO_EXTENSION") == "1":
        _warn("PORTLLM_NO_EXTENSION=1: not building portllm._C; the reference backend will be used.")
        return [], {}, {"extension": "not built: PORTLLM_NO_EXTENSION=1 at install"}
    try:
        import torch
    except Exception as e:  # torch missing from the build environment
        why = (f"torch was not importable when portllm was built ({e}); install torch first, then portllm with "
               "`pip install --no-build-isolation .`")
        _warn(why + "; not building portllm._C")
        return [], {}, {"extension": f"not built: {why}"}

    force = os.environ.get("PORTLLM_FORCE_CUDA") == "1"
    cuda_why = None
    if os.environ.get("PORTLLM_NO_CUDA") == "1":
        cuda_why = "PORTLLM_NO_CUDA=1 at install"
    elif torch.version.cuda is None and not force:
        cuda_why = "torch has no CUDA"
    else:
        home, how = find_cuda_home()
        if home is None:
            cuda_why = how
        else:
            os.environ["CUDA_HOME"] = home
    import torch.utils.cpp_extension as cpp_ext
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_why is None:
        cpp_ext.CUDA_HOME = os.environ["CUDA_HOME"]  # torch's builder read it at import, maybe before we set it

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-fopenmp", "-DPORTLLM_WITH_OPENMP"]
    common = dict(name="portllm._C", include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    cpu_ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    if cuda_why is not None:
        if torch.version.cuda is not None:  # a CUDA torch without the CUDA kernels: say so loudly
            _warn(f"building portllm._C without CUDA kernels ({cuda_why}); CPU kernels only.")
        first = cpu_ext
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
        try:
            first = CUDAExtension(sources=sources + cuda_sources, define_macros=[("PORTLLM_WITH_CUDA", "1")],
                                  extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr",
                                                                            "-lineinfo"]}, **common)
        except Exception as e:  # noqa: BLE001 (torch's builder refuses this toolkit)
            cuda_why = f"the CUDA part could not be set up ({type(e).__name__}: {e})"
            _warn(f"building portllm._C without CUDA kernels ({cuda_why}); CPU kernels only.")
            first = cpu_ext
    report = {"torch": torch.__version__, "cuda": "built" if cuda_why is None else f"not built: {cuda_why}"}

    class SafeBuildExtension(BuildExtension):
        """BuildExtension whose failure is a warning: a failed CUDA part falls back to the CPU part,
        a failed CPU part leaves the reference backend; the package still installs, and
        ``_build.json`` says what happened."""

        def run(self):
            # run() replaces the compiler option by the compiler object, and sets inplace False while it
            # builds (restoring it only on success): a retry needs both as they were.
            compiler_option, inplace = self.compiler, self.inplace
            try:
                super().run()
                report["extension"] = "built"
            except Exception as e:  # noqa: BLE001 (any compiler or linker failure)
                cause = " ".join(f"{type(e).__name__}: {e}".split())[:400]
                if self.extensions and self.extensions[0] is not cpu_ext and "CPU fallback" not in report:
                    report["cuda"] = f"not built: the CUDA part failed to build or link ({cause})"
                    _warn(f"the CUDA kernels of portllm._C failed to build or link ({cause}; the compiler output "
                          "is above); building the CPU kernels alone. Fix: set CUDA_HOME to the toolkit (the "
                          "directory with bin/nvcc and lib64/libcudart.so), or PORTLLM_NO_CUDA=1 to skip CUDA.")
                    # The CPU extension's settings onto the extension setuptools finalised (its private
                    # bookkeeping stays; a fresh Extension object would lack it).
                    for key, value in vars(cpu_ext).items():
                        if not key.startswith("_"):
                            setattr(self.extensions[0], key, value)
                    report["CPU fallback"] = True
                    self.compiler, self.inplace = compiler_option, inplace
                    try:
                        super().run()
                        report["extension"] = "built"
                    except Exception as e2:  # noqa: BLE001
                        self._failed(e2)
                        self.inplace = inplace
                else:
                    self._failed(e)
            self.inplace = inplace  # (left False by a failed run: the record goes beside the package)
            self._write_report()

        def _failed(self, e):
            cause = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            report["extension"] = f"not built: the build failed ({cause})"
            _warn(f"building portllm._C failed ({cause}); portllm will run on its reference backend.")

        def _write_report(self):
            target = os.path.dirname(self.get_ext_fullpath("portllm._C"))
            os.makedirs(target, exist_ok=True)
            tmp = os.path.join(target, f".{BUILD_REPORT}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, os.path.join(target, BUILD_REPORT))

    return [first], {"build_ext": SafeBuildExtension.with_options(use_ninja=True)}, report


def _write_source_report(report):
    """Where no extension is built (build_ext does not run), the record goes into the source tree,
    which both an editable install and a wheel (as package data) read."""
    path = os.path.join(HERE, "portllm", BUILD_REPORT)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import its functions)
    ext_modules, cmdclass, report = _extensions()
    if not ext_modules:
        _write_source_report(report)
    setup(
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data={"portllm": [BUILD_REPORT]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
