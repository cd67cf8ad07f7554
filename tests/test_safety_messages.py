"""Every refusal is one line that names the file, field, module or tensor at fault; an interrupt
ends with one line and exit status 130; a long output name works."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safety_fixtures import MODULES, make_checkpoint, make_patch, snapshot

from portllm import cli
from portllm.safetensors_io import SafetensorsReader, write_tensors


@pytest.fixture
def world(tmp_path):
    model = tmp_path / "model"
    make_checkpoint(model)
    patch = tmp_path / "patch"
    make_patch().save(str(patch))
    return tmp_path, str(model), str(patch)


def run(capsys, *argv):
    code = cli.main(list(argv))
    cap = capsys.readouterr()
    return code, cap.err.strip()


def port(capsys, model, patch, out, *extra):
    return run(capsys, "port", "--model", model, "--patch", patch, "--out", str(out), "--device", "cpu", "--quiet",
               *extra)


def _rewrite(path, edit_tensors=None, edit_meta=None):
    with SafetensorsReader(path) as rd:
        tensors = {k: rd[k].clone() for k in rd.keys()}
        meta = dict(rd.metadata)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    write_tensors(path, tensors, meta)


@pytest.mark.parametrize("dtype,hint", [(torch.float8_e4m3fn, "FP8"), (torch.int8, "integer"),
                                        (torch.float64, "float32 first")])
def test_weights_the_kernels_cannot_merge_into(world, capsys, dtype, hint):
    root, model, patch = world
    idx = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    key = f"{MODULES[0]}.weight"
    path = os.path.join(model, idx["weight_map"][key])

    def to_dtype(t):
        t[key] = t[key].float().clamp(-100, 100).to(dtype)

    _rewrite(path, to_dtype)
    before = snapshot(model, patch)
    code, err = port(capsys, model, patch, root / "o")
    assert code == 1 and f"module {MODULES[0]}" in err and hint in err and "\n" not in err, err
    assert not os.path.exists(root / "o") and snapshot(model, patch) == before


@pytest.mark.parametrize("meta,message", [
    ("[1, 2]", "portllm metadata is a JSON list, not an object"),
    ('{"base_sketches": {"model.layers.0.self_attn.q_proj": {"shape": "x"}}}', "base_sketches['model.layers.0"),
    ('{"base_sketches": [1]}', "'base_sketches' must be an object"),
    ("[" * 100000 + "]" * 100000, "corrupt portllm metadata"),
])
def test_malformed_portllm_metadata(world, capsys, meta, message):
    root, model, patch = world
    weights = os.path.join(patch, "adapter_model.safetensors")
    _rewrite(weights, edit_meta=lambda m: m.__setitem__("portllm", meta))
    code, err = run(capsys, "inspect", patch)
    assert code == 1 and message in err and weights in err and "\n" not in err, err


def test_a_header_of_nested_brackets(tmp_path, capsys):
    path = tmp_path / "adapter_model.safetensors"
    body = b"[" * 100000 + b"]" * 100000
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    code, err = run(capsys, "inspect", str(tmp_path))
    assert code == 1 and str(path) in err and "corrupt safetensors header" in err and "\n" not in err, err


def test_a_scale_beyond_float32(world, capsys):
    root, model, patch = world
    code, err = port(capsys, model, patch, root / "o", "--scale", "1e300")
    assert code == 1 and "module model.layers" in err and "does not fit" in err and "\n" not in err, err
    assert not os.path.exists(root / "o")


def test_a_write_error_without_a_path_names_the_output(world, capsys, monkeypatch):
    root, model, patch = world
    import importlib

    P = importlib.import_module("portllm.port")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P, "_copy_other_files", full)
    code, err = port(capsys, model, patch, root / "o")
    assert code == 1 and "No space left on device" in err and str(root / "o") in err and "\n" not in err, err
    assert not os.path.exists(root / "o")


def test_a_long_output_name(world, capsys):
    """A 250-character --out: the hidden staging and lock names beside it stay within 255 bytes."""
    root, model, patch = world
    out = root / ("o" * 250)
    code, err = port(capsys, model, patch, out)
    assert code == 0, err
    assert os.path.exists(out / "model.safetensors.index.json")
    assert sorted(os.listdir(root)) == sorted(["model", "patch", "o" * 250])


def test_sigint_ends_with_one_line_and_130(world):
    root, model, patch = world
    out = root / "o"
    child = textwrap.dedent(f"""
        import sys, time, importlib
        P = importlib.import_module("portllm.port")
        real = P._copy_other_files
        def slow(*a, **k):
            real(*a, **k)
            print("writing", flush=True)
            time.sleep(60)
        P._copy_other_files = slow
        from portllm import cli
        sys.exit(cli.main(["port", "--model", {model!r}, "--patch", {patch!r}, "--out", {str(out)!r},
                           "--device", "cpu", "--quiet"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == f"portllm port: interrupted; no partial output was left at {out}", err
    assert not os.path.exists(out)
    assert [e for e in os.listdir(root) if e.startswith(".o.")] == []
