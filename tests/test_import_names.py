"""portllm owns the import names ``portllm`` and ``portllm.*``, and nothing else, from any directory.

transformers imports Hugging Face's ``kernels`` distribution whenever a model module loads. A
``kernels/__init__.py`` at the repository's root made ``python -m pytest``, ``python -m portllm...``
and any script run from the root import this repository's Triton folder under that name instead
(``cannot import name 'CUDAProperties' from 'kernels'``). The Triton kernels stay in the top-level
``kernels/`` folder, with no ``__init__.py``, reachable only as ``portllm.kernels`` (the link
``portllm/kernels -> ../kernels``): in the source tree, the editable install and the wheel alike.

Each check runs in a fresh interpreter whose ``sys.path`` starts with the directory under test,
exactly as ``python`` started in that directory has it, and each is shown to fail on a tree that
puts a top-level ``kernels/__init__.py`` back.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Directories whose entries become import names: the root (``python`` or ``python -m`` started
# there), and the two the suite itself puts on sys.path (pytest's rootdir conftest, tools/).
PATH_DIRS = ("", "tests", "tools")

# Run with the directory first on sys.path; reports where each name resolves, as JSON.
_PROBE = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
out = {"transformers": None, "names": {}}
try:
    import transformers.modeling_utils  # imports the `kernels` distribution on transformers >= 5.2x
except Exception as e:
    out["transformers"] = f"{type(e).__name__}: {e}"
for name in sys.argv[2:]:
    try:
        m = importlib.import_module(name)
    except Exception as e:
        out["names"][name] = {"error": f"{type(e).__name__}: {e}"}
        continue
    out["names"][name] = {"file": getattr(m, "__file__", None),
                          "path": [str(p) for p in getattr(m, "__path__", [])]}
print(json.dumps(out))
"""


def _importable_names(directory):
    """The top-level import names a directory on sys.path offers: packages (regular or
    namespace), modules, and extension modules."""
    names = {}
    for entry in sorted(os.listdir(directory)):
        full = os.path.join(directory, entry)
        if os.path.isdir(full) and entry.isidentifier():
            names[entry] = "package" if os.path.isfile(os.path.join(full, "__init__.py")) else "namespace"
        elif os.path.isfile(full):
            stem, dot, ext = entry.partition(".")
            if dot and stem.isidentifier() and (ext == "py" or ext.endswith("so")):
                names[stem] = "module"
    return names


def _distribution_names():
    """Top-level import names of the installed distributions -> the distributions."""
    return {k: sorted(set(v)) for k, v in importlib.metadata.packages_distributions().items()
            if k != "portllm"}


def _under(path, directory):
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _inside(path, root):
    """Whether ``path`` is one of the repository's own files (an environment that lives in the
    checkout, such as .venv, is not)."""
    return path is not None and _under(path, root) and not _under(path, sys.prefix)


def shadowing_faults(root):
    """Every way the tree at ``root`` shadows an installed distribution or breaks transformers'
    import, as messages (empty: none)."""
    faults = []
    dists = _distribution_names()
    for sub in PATH_DIRS:
        directory = os.path.join(root, sub)
        if not os.path.isdir(directory):
            continue
        offered = _importable_names(directory)
        probe = sorted(n for n in offered if n in dists or n == "kernels")
        res = subprocess.run([sys.executable, "-c", _PROBE, directory, *probe], cwd=directory,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        report = json.loads(res.stdout.strip().splitlines()[-1])
        where = os.path.join(sub or ".", "")
        if report["transformers"] is not None:
            faults.append(f"from {where}: import transformers.modeling_utils failed: {report['transformers']}")
        for name in probe:
            kind = offered[name]
            if kind in ("package", "module") and name in dists:
                faults.append(f"{where}{name} ({kind}) has the import name of the installed {dists[name]}")
            got = report["names"][name]
            if "error" in got:
                if name in dists:
                    faults.append(f"from {where}: import {name} ({dists[name]}) failed: {got['error']}")
                continue
            if _inside(got["file"], root):
                faults.append(f"from {where}: import {name} gives {got['file']}, inside the repository")
            elif name in dists and any(_inside(p, root) for p in got["path"]):
                faults.append(f"from {where}: import {name} ({dists[name]}) reaches into the repository: "
                              f"{got['path']}")
    return faults


def test_no_root_name_shadows_an_installed_distribution():
    """transformers' model modules import, and ``kernels`` and every other name an installed
    distribution owns resolve outside the repository, from the root, tests/ and tools/."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert shadowing_faults(ROOT) == []


def test_the_check_fails_when_kernels_init_comes_back(tmp_path):
    """The same check on a tree that puts a top-level ``kernels/__init__.py`` back reports it."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('"""Triton kernels of portllm."""\n')
    faults = shadowing_faults(str(tmp_path))
    assert any("kernels" in f and "inside the repository" in f for f in faults), faults
    if "kernels" in _distribution_names():
        assert any("kernels (package) has the import name" in f for f in faults), faults


def test_kernels_reachable_only_as_portllm_kernels():
    """``portllm.kernels`` is the top-level ``kernels/`` folder, through the link in portllm/."""
    link = os.path.join(ROOT, "portllm", "kernels")
    assert os.path.islink(link) and os.readlink(link) == os.path.join("..", "kernels")
    import portllm.kernels

    assert [os.path.realpath(p) for p in portllm.kernels.__path__] == [os.path.join(os.path.realpath(ROOT), "kernels")]


@pytest.mark.slow
def test_wheel_lays_out_portllm_only(tmp_path):
    """A wheel built from a copy of the tree holds every Triton kernel as portllm/kernels/*.py and
    no top-level name but ``portllm``. Built offline, without the extension (its build is not
    what is checked here)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(os.path.join(ROOT, "portllm"), src / "portllm", symlinks=True, ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), src / "kernels", ignore=ignore)
    env = dict(os.environ, PORTLLM_NO_EXTENSION="1", PIP_NO_INDEX="1")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                          "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = (tmp_path / "dist").glob("portllm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
        top_level = z.read(next(f for f in files if f.endswith(".dist-info/top_level.txt"))).decode().split()
    assert top_level == ["portllm"]
    assert {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")} == {"portllm"}
    kernels = sorted(f for f in os.listdir(os.path.join(ROOT, "kernels")) if f.endswith(".py"))
    assert kernels and all(f"portllm/kernels/{k}" in files for k in kernels), (kernels, files)
    sources = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "portllm"))
               for f in fs if f.endswith(".py") and "__pycache__" not in d]
    assert sources and [f for f in sources if f not in files] == []


def test_setup_lists_every_package():
    """Every folder of portllm/ with an __init__.py is a package the wheel ships (setup.py's PACKAGES):
    one left out installs from a wheel without it, while the editable install still finds it."""
    import ast

    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    listed = next(ast.literal_eval(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  and any(getattr(t, "id", None) == "PACKAGES" for t in n.targets))
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, fs in os.walk(os.path.join(ROOT, "portllm"))
             if "__init__.py" in fs and "__pycache__" not in d}
    assert found - {"portllm.kernels"} <= set(listed) and "portllm.kernels" in listed, (found, listed)
