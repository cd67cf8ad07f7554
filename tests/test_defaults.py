"""Defaults chosen by measurement: the committed table matches the committed benchmark results, and
no backend measured slower than the reference is ever a default."""

import glob
import importlib.util
import json
import os

import torch

from portllm import defaults, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gen():
    spec = importlib.util.spec_from_file_location("gen_defaults", os.path.join(ROOT, "tools", "gen_defaults.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_table_matches_the_results():
    gen = _gen()
    table = gen.generate(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    from portllm._defaults_table import TABLE

    assert TABLE == table, "portllm/_defaults_table.py is out of date: run python tools/gen_defaults.py"


def test_no_default_is_slower_than_the_reference():
    """Recomputed from the raw rows: every backend ahead of the reference was faster on average."""
    from portllm._defaults_table import TABLE

    gen = _gen()
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")):
        one = gen.generate([path])
        for cls, ops_ in one.items():
            for op, order in ops_.items():
                assert order[-1] == "reference"
                assert all(b in TABLE[cls][op] for b in order)


def test_order_ends_with_the_reference_and_unmeasured_classes_use_it(monkeypatch):
    assert defaults.order("patch_add_", "cpu")[-1] == "reference"
    monkeypatch.setattr(defaults, "TABLE", {})
    assert defaults.order("patch_add_", "cpu") == ("reference",)
    assert ops.default_backend("cpu") == "reference"


def test_cpu_class_follows_the_forced_path(monkeypatch):
    from portllm import _ext

    if not _ext.available():
        assert defaults.device_class("cpu") == "cpu-generic"
        return
    monkeypatch.setenv("PORTLLM_CPU_ISA", "generic")
    assert defaults.device_class("cpu") == "cpu-generic"
    monkeypatch.delenv("PORTLLM_CPU_ISA")
    assert defaults.device_class(torch.device("cpu")) == f"cpu-{_ext.cpu_isa()}"


def test_results_record_the_cpu_path():
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "results", "cpu-*.json")):
        with open(path) as f:
            d = json.load(f)
        assert "cpu=" in d["versions"]["portllm_build"]
