"""Start-up (#27): ``import portllm``, ``portllm --help`` and ``--version`` do not import torch; the port
command states its start-up apart from its job; ``portllm.port`` stays the function whichever
submodule loads first."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["port", "--help"], []])
def test_cli_without_torch(argv):
    res = _py("import sys\nsys.argv = ['portllm', *%r]\nfrom portllm.cli import main\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\n"
              "print('torch imported' if 'torch' in sys.modules else 'no torch')" % (argv,))
    assert res.stdout.strip().splitlines()[-1] == "no torch", res.stdout + res.stderr


def test_import_portllm_without_torch_and_names_on_first_use():
    res = _py("import sys, portllm\nassert 'torch' not in sys.modules\n"
              "import portllm.port, portllm.pmss\n"  # the submodule portllm.port loads first: the name is the function
              "assert callable(portllm.port) and portllm.port.__module__ == 'portllm.port', portllm.port\n"
              "assert portllm.apply_patch.__module__ == 'portllm.apply' and portllm.Patch.__name__ == 'Patch'\n"
              "assert sorted(portllm.__all__) == sorted(set(portllm.__all__)) and 'port' in dir(portllm)\n"
              "try:\n    portllm.nothing\nexcept AttributeError as e:\n    print(e)\n")
    assert res.returncode == 0, res.stderr
    assert "module 'portllm' has no attribute 'nothing'" in res.stdout


def test_process_seconds():
    from portllm.cli import _process_seconds

    t = _process_seconds()
    assert t is None or 0 < t < 24 * 3600


def test_port_command_states_its_start_up(tmp_path):
    """The command line's report gives the start-up apart from the job (a caller of main(argv) gets none)."""
    import torch

    from portllm.patch import Patch, PatchModule
    from portllm.safetensors_io import write_tensors

    os.makedirs(tmp_path / "m")
    write_tensors(str(tmp_path / "m" / "model.safetensors"), {"l.weight": torch.randn(8, 6).bfloat16()})
    Patch({"l": PatchModule(torch.randn(8, 2), torch.randn(2, 6), 1.0)}).save(str(tmp_path / "p"))
    res = subprocess.run([sys.executable, "-m", "portllm.cli", "port", "--model", str(tmp_path / "m"), "--patch",
                          str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--quiet"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr
    last = res.stdout.strip().splitlines()[-1]
    assert "merged 1 modules" in last and "; start-up (Python, torch, portllm)" in last, last
    startup = float(last.rsplit("start-up (Python, torch, portllm) ", 1)[1].split()[0])
    assert startup >= 0.2, f"start-up {startup} s: torch's import alone takes longer than that ({last})"
    assert os.path.exists(tmp_path / "o" / "model.safetensors")
