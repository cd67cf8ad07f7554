"""portllm's kernels as vLLM's LoRA backend: found by vLLM through its plugin entry point, in every
vLLM process, and off unless the user opts in."""

import importlib.metadata
import json
import os
import subprocess
import sys
import typing

import pytest

import tiny
from conftest import plugin_on, serve
from test_served_exactly import _mixed_want

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = "portllm.vllm_punica.PortllmPunicaWrapperCPU"
VLLMS = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def test_vllm_sees_the_entry_point():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("portllm") == "portllm.vllm_plugin:register"


def _wrapper_after_plugins_load(**env) -> str:
    """The punica wrapper vLLM would build, in a fresh process after vLLM loaded its general plugins."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from vllm.platforms import current_platform; print('WRAPPER', current_platform.get_punica_wrapper())")
    clean = {k: v for k, v in os.environ.items() if k not in ("PORTLLM_VLLM_LORA", "VLLM_PLUGINS")}
    res = subprocess.run([sys.executable, "-c", code], env=dict(clean, **env), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return next(line.split()[1] for line in res.stdout.splitlines() if line.startswith("WRAPPER"))


@pytest.mark.parametrize("env,want", [({}, VLLMS), ({"PORTLLM_VLLM_LORA": "1"}, OURS),
                                      ({"VLLM_PLUGINS": "portllm"}, OURS),
                                      ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, VLLMS)])
def test_off_until_opted_in(env, want):
    """Installed, the plugin changes nothing; PORTLLM_VLLM_LORA=1, or naming it in VLLM_PLUGINS, turns it on."""
    assert _wrapper_after_plugins_load(**env) == want


def test_in_vllms_own_processes(work):
    """With vLLM's engine core and worker in processes of their own, the entry point turns the backend
    on there: the mixed batch comes out right, which vLLM 0.32's own CPU path gets wrong."""
    env = dict(os.environ, PORTLLM_VLLM_LORA="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    res = subprocess.run([sys.executable, os.path.join(HERE, "serve_mixed.py"), work["base"], work["lora0"],
                          work["lora1"]], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Using PortllmPunicaWrapperCPU" in res.stdout + res.stderr
    got = json.loads(next(line[7:] for line in res.stdout.splitlines() if line.startswith("TOKENS ")))
    assert got == _mixed_want(work)


def test_rank_limits_are_vllms():
    """portllm.vllm_limits (what Patch.save and extract say) holds vLLM's own list of max_lora_rank values."""
    from vllm.config.lora import MaxLoRARanks

    from portllm.vllm_limits import MAX_LORA_RANKS

    assert tuple(typing.get_args(MaxLoRARanks)) == MAX_LORA_RANKS


def test_a_rank_between_vllms_values_is_padded(work):
    """A rank-96 patch on an engine of max_lora_rank 128 (the rank vllm_limits names): served as PEFT
    runs it, on both LoRA backends."""
    from portllm.vllm_limits import max_lora_rank_for

    path = tiny.lora_adapter(work["base"], os.path.join(work["root"], "lora96"), rank=96, seed=4)
    want = tiny.greedy(tiny.hf(work["base"], path))
    from conftest import lora

    req = lora("r96", 20, path)
    assert serve(work["base"], req, max_lora_rank=max_lora_rank_for(96)) == want
    with plugin_on():
        assert serve(work["base"], req, max_lora_rank=max_lora_rank_for(96)) == want


def test_portllms_kernels_are_built_here():
    """Without portllm._C the backend would fall back to the reference ops and every test above would
    still pass: the C++ kernels must be what runs here."""
    from portllm import _ext

    assert _ext.has_kernel("lora_shrink", "CPU") and _ext.has_kernel("lora_expand_", "CPU"), _ext.build_info()


def test_backend_takes_the_cpp_kernels_up_to_the_measured_tokens_per_adapter(monkeypatch):
    """Up to 16 tokens of one adapter in a step where the AVX-512 decode kernels run, 8 on other paths
    (benchmarks/vllm_ops_crossover.py); more go to the ops' default."""
    import torch

    from portllm import _ext, vllm_punica

    best = _ext.cpu_isa()
    for isa, limit in (("avx2", 8), ("generic", 8)) + (((best, 16),) if best.startswith("avx512") else ()):
        monkeypatch.setenv("PORTLLM_CPU_ISA", isa)
        assert vllm_punica.max_tokens_per_adapter() == limit
        assert vllm_punica._direct(torch.tensor([0] * limit + [1, -1]))
        assert not vllm_punica._direct(torch.tensor([0] * (limit + 1) + [1]))
        assert vllm_punica._direct(torch.tensor([-1] * 40))
