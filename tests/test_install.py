"""The install tells the truth: the CUDA toolkit is found the way it is really laid out (a wrapper
``nvcc`` on PATH included), a CUDA part that fails falls back to the CPU kernels, and a wheel
installed non-editable in a fresh venv either has its kernels or says, at import and in
``portllm info``, why not."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_module():
    """setup.py's functions, without running setup() (it runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("portllm_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toolkit(root, with_cudart=True):
    """A directory laid out as a CUDA toolkit; its bin/nvcc answers --dryrun with its TOP."""
    os.makedirs(root / "bin")
    os.makedirs(root / "include")
    os.makedirs(root / "lib64")
    (root / "include" / "cuda_runtime.h").write_text("")
    if with_cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho '#$ TOP={root}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    return root


def _wrapper(bindir, target):
    os.makedirs(bindir, exist_ok=True)
    w = bindir / "nvcc"
    w.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    w.chmod(0o755)
    return str(w)


def test_a_wrapper_nvcc_leads_to_its_real_toolkit(tmp_path):
    S = _setup_module()
    tk = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "usr-local" / "bin", tk / "bin" / "nvcc")
    home, how = S.find_cuda_home(environ={}, which=lambda _: wrapper)
    assert home == os.path.realpath(tk), (home, how)
    # What torch's own builder takes for a wrapper (the wrapper's grandparent) is no toolkit:
    assert S._toolkit_problem(str(tmp_path / "usr-local")) is not None


def test_a_toolkit_without_cudart_is_not_used(tmp_path):
    S = _setup_module()
    tk = _toolkit(tmp_path / "cuda", with_cudart=False)
    home, how = S.find_cuda_home(environ={"CUDA_HOME": str(tk)}, which=lambda _: None)
    assert home is None and "libcudart" in how and "CUDA_HOME" in how
    home, how = S.find_cuda_home(environ={}, which=lambda _: str(tk / "bin" / "nvcc"))
    assert home is None and "set CUDA_HOME" in how and "libcudart" in how
    home, how = S.find_cuda_home(environ={}, which=lambda _: None)
    assert home is None or home == "/usr/local/cuda"


def test_this_machines_nvcc():
    """Where nvcc is installed (these machines: a wrapper script in /usr/local/bin), the toolkit
    found has nvcc, the runtime headers and libcudart."""
    S = _setup_module()
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    home, how = S.find_cuda_home(environ={})
    assert home is not None, how
    assert S._toolkit_problem(home) is None


def _source_copy(dst):
    """The files a build needs, without this checkout's built extension or its build record."""
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "_build.json", "*.o")
    shutil.copytree(os.path.join(ROOT, "portllm"), dst / "portllm", symlinks=True, ignore=ignore)
    for d in ("kernels", "csrc"):
        shutil.copytree(os.path.join(ROOT, d), dst / d, ignore=ignore)
    return dst


def _build_wheel(tmp_path, **env):
    src = _source_copy(tmp_path / "src")
    e = dict(os.environ, PIP_NO_INDEX="1", **env)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=1800, env=e,
                         cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("portllm-*.whl")
    return wheel, res


def _fresh_venv_with(tmp_path, wheel):
    """A new venv that sees this environment's packages (torch, ...) but not this checkout, with
    the wheel installed into it, non-editable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "_parent_env.pth"), "w") as f:  # after the venv's own site-packages
        f.write("\n".join(sorted(ours)) + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site,
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return py


def _in_venv(py, tmp_path, code):
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    return res


_PROBE = ("import json, portllm, portllm._ext as e; print(json.dumps({'file': portllm.__file__, "
          "'available': e.available(), 'error': e.ERROR, 'record': e.build_record(), 'lines': e.kernels_built()}))")


@pytest.mark.slow
def test_wheel_without_the_extension_says_why(tmp_path):
    wheel, _ = _build_wheel(tmp_path, PORTLLM_NO_EXTENSION="1")
    py = _fresh_venv_with(tmp_path, wheel)
    res = _in_venv(py, tmp_path, _PROBE)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["file"].startswith(ROOT), "the wheel's portllm, not the checkout's"
    assert got["available"] is False
    assert "PORTLLM_NO_EXTENSION=1" in got["error"] and "circular" not in got["error"]
    assert "PORTLLM_NO_EXTENSION=1" in res.stderr and "pip install --no-build-isolation" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["wheel", "inplace"])
def test_a_cuda_part_that_fails_falls_back_to_the_cpu_kernels(tmp_path, how):
    """PORTLLM_FORCE_CUDA=1 with this torch (no CUDA) makes the CUDA part fail, as a failed CUDA
    link does: the install warns, builds the CPU kernels alone, and the installed wheel (or the
    in-place build an editable install makes) has them and says why it has no CUDA kernels."""
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit here to attempt the CUDA part with")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA: the CUDA part would build")
    env = {"PORTLLM_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0"}
    if how == "wheel":
        wheel, _ = _build_wheel(tmp_path, **env)
        py = _fresh_venv_with(tmp_path, wheel)
        where = tmp_path
    else:  # what `pip install -e .` runs: build_ext in place, into the source tree
        src = _source_copy(tmp_path / "src")
        res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=str(src),
                             capture_output=True, text=True, timeout=1800, env=dict(os.environ, **env))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "failed to build or link" in res.stderr and "building the CPU kernels alone" in res.stderr
        assert glob.glob(str(src / "portllm" / "_C*.so")), "the CPU kernels were built into the package"
        py, where = sys.executable, src
    got = json.loads(_in_venv(py, where, _PROBE).stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(where)) or how == "wheel", got["file"]
    assert got["available"] is True, got
    assert got["record"]["extension"] == "built"
    assert got["record"]["cuda"].startswith("not built: the CUDA part failed to build or link"), got["record"]
    info = _in_venv(py, where, "from portllm import cli; cli.main(['info'])").stdout
    assert "C++ CPU kernels: built" in info and "CUDA kernels: not built: the CUDA part failed" in info
