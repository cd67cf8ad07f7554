"""Defaults chosen by measurement: the committed table matches the committed benchmark results, and
no backend measured slower than the reference is ever a default."""

import glob
import importlib.util
import json
import os

import pytest
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


def _result(rows, isa="avx2"):
    return {"device": {"type": "cpu"}, "versions": {"portllm_build": f"cpu={isa}"}, "results": rows}


def _rows(cpp_ms=1.0, hashes=None):
    base = dict(op="patch_add_", case="single", m=64, n=64, r=16, dtype="bfloat16", factor_dtype="bfloat16")
    ref = dict(base, provider="portllm-reference", median_ms=2.0)
    cpp = dict(base, provider="portllm-cpp", isa="avx2", median_ms=cpp_ms)
    if hashes is not None:
        cpp["source_hashes"] = hashes
    return [ref, cpp]


def test_only_rows_of_the_current_source_count(tmp_path):
    """A row records the hash of the kernel source it timed; a row of another source (the kernel edited
    since), or of none, is stale: its backend is no default until it is measured again."""
    from portllm import sources

    gen = _gen()
    now = sources.source_hash("patch_add_", "cpp")
    if now is None:
        pytest.skip("no csrc/ here (an installed package): nothing to hash")
    stamped = gen.stamp(_rows()[1])
    assert stamped["source_hashes"] == {"patch_add_": now}
    for hashes, want in ((None, ["reference"]), ({"patch_add_": "0" * 16}, ["reference"]),
                         ({"patch_add_": now}, ["cpp", "reference"])):
        path = tmp_path / "r.json"
        path.write_text(json.dumps(_result(_rows(hashes=hashes))))
        table, made = gen.generate([str(path)], with_sources=True)
        # (a class with nothing fresh has no entry: defaults.order then gives the reference alone)
        assert table.get("cpu-avx2", {}).get("patch_add_", ["reference"]) == want, hashes
        assert made.get("cpu-avx2", {}).get("patch_add_", {}) == ({"cpp": now} if "cpp" in want else {})


def test_source_hash_follows_the_kernel_files(tmp_path):
    """The hash covers the op's kernel files of that backend (and their shared headers), nothing else."""
    import shutil

    from portllm import sources

    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("no csrc/ here")
    for d in ("csrc", "kernels"):
        shutil.copytree(os.path.join(ROOT, d), tmp_path / d)
    before = {(op, b): sources.source_hash(op, b, str(tmp_path)) for op in ("patch_add_", "fp8_merge")
              for b in ("cpp", "triton")}
    assert before == {k: sources.source_hash(*k) for k in before} and all(before.values())
    with open(tmp_path / "csrc" / "cpu" / "patch_add.cpp", "a") as f:
        f.write("\n// edited\n")
    after = {k: sources.source_hash(*k, str(tmp_path)) for k in before}
    assert after[("patch_add_", "cpp")] != before[("patch_add_", "cpp")]
    assert {k: v for k, v in after.items() if k != ("patch_add_", "cpp")} == \
        {k: v for k, v in before.items() if k != ("patch_add_", "cpp")}
    assert sources.source_hash("patch_add_", "reference") is None


def test_every_default_was_measured_on_the_current_source():
    """What portllm info says: each default ahead of the reference was measured on its kernel as it is now."""
    from portllm._defaults_table import SOURCES, TABLE

    for cls, per in TABLE.items():
        for op, order in per.items():
            for b in order[:-1]:
                assert SOURCES[cls][op][b] is not None
    if os.path.isdir(os.path.join(ROOT, "csrc")):
        for dev in ("cpu",):
            for op in ops.IMPLEMENTATIONS:
                assert all(v is True for v in defaults.measured_on_current_source(op, dev).values()), op


def test_a_never_default_kernel_stays_out_however_fast(tmp_path, monkeypatch):
    """skeleton_mm's CUDA kernel (fp32 FMA) is a tested option, never a default: a row measuring it
    faster than the reference, of the current source, still leaves the reference alone."""
    gen = _gen()
    assert ("skeleton_mm", "cuda") in gen.NEVER_DEFAULT
    monkeypatch.setattr(gen.sources, "source_hash", lambda op, b, *a: "h" * 16)
    base = dict(op="pmss_layer", m=64, n=64, r=16, dtype="bfloat16")
    rows = [dict(base, provider="pmss-reference", median_ms=2.0),
            dict(base, provider="pmss-cuda", median_ms=1.0, source_hashes={"skeleton_mm": "h" * 16}),
            dict(base, provider="pmss-triton", median_ms=1.5, source_hashes={"skeleton_mm": "h" * 16})]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": {"type": "cuda"}, "versions": {}, "results": rows}))
    assert gen.generate([str(path)]) == {"cuda": {"skeleton_mm": ["triton", "reference"]}}
    monkeypatch.setattr(gen, "NEVER_DEFAULT", {})
    assert gen.generate([str(path)]) == {"cuda": {"skeleton_mm": ["cuda", "triton", "reference"]}}
