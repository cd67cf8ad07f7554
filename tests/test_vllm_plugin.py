"""portllm's side of vLLM, testable without vLLM (the tests with vLLM run in their own venv:
tests_vllm/, make test-vllm): the plugin's opt-in, its entry point, and what a saved patch says about
serving it with vLLM."""

import os
import sys
import tomllib
import warnings

import pytest
import torch

from portllm import Patch, PatchModule, vllm_limits, vllm_plugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env,want", [({}, False), ({"VLLM_PLUGINS": ""}, False),
                                      ({"VLLM_PLUGINS": "lora_filesystem_resolver"}, False),
                                      ({"PORTLLM_VLLM_LORA": "0"}, False), ({"PORTLLM_VLLM_LORA": "1"}, True),
                                      ({"VLLM_PLUGINS": "portllm"}, True),
                                      ({"VLLM_PLUGINS": "lora_filesystem_resolver, portllm"}, True)])
def test_opt_in(env, want):
    """vLLM loads every installed plugin when VLLM_PLUGINS is unset: that is no choice of portllm's."""
    assert vllm_plugin.opted_in(env) is want


def test_not_opted_in_register_touches_nothing(monkeypatch):
    """Without the opt-in, register returns before importing vLLM (here there is none to import)."""
    monkeypatch.delenv("PORTLLM_VLLM_LORA", raising=False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm would raise
    monkeypatch.setitem(sys.modules, "vllm.platforms", None)
    assert vllm_plugin.register() is None


def test_entry_point_declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        eps = tomllib.load(f)["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {vllm_plugin.NAME: "portllm.vllm_plugin:register"}


def _patch(ranks):
    g = torch.Generator().manual_seed(0)
    return Patch({f"model.layers.{i}.mlp.up_proj": PatchModule(torch.randn(16, r, generator=g), torch.randn(r, 8, generator=g), 1.0)
                  for i, r in enumerate(ranks)})


@pytest.mark.parametrize("rank,want", [(1, 1), (2, 8), (8, 8), (9, 16), (96, 128), (300, 320), (512, 512), (513, None)])
def test_max_lora_rank_for(rank, want):
    assert vllm_limits.max_lora_rank_for(rank) == want


def test_serving_note_names_the_rank_to_serve_with():
    note = vllm_limits.serving_note(_patch([8, 96]))
    assert "--max-lora-rank 128" in note and "pads rank 96 to 128" in note
    assert vllm_limits.unservable(_patch([8, 96])) is None


def test_a_patch_vllm_cannot_serve_is_said_at_save(tmp_path):
    """Rank 600 exceeds every max_lora_rank vLLM accepts: the save warns, naming the module and rank,
    and still writes the patch (it ports like any other)."""
    p = _patch([8, 600])
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp\.up_proj has rank 600.*portllm port"):
        path = p.save(str(tmp_path / "p"))
    assert Patch.load(path).modules["model.layers.1.mlp.up_proj"].rank == 600
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _patch([8, 64]).save(str(tmp_path / "q"))  # servable: no warning
