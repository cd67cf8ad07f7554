"""Patch files: PEFT's config fields, round trips, and every bad input refused with a clear message."""

import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import evolve, llama, train_peft_adapter  # noqa: E402

import portllm  # noqa: E402
from portllm import cli  # noqa: E402
from portllm.patch import Patch, PatchFormatError, PatchModule  # noqa: E402
from portllm.safetensors_io import write_tensors  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    adapter = str(root / "adapter")
    train_peft_adapter(llama(seed=0), adapter, r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    model_dir = str(root / "model")
    evolve(llama(seed=0)).to(torch.bfloat16).save_pretrained(model_dir)
    return {"root": root, "adapter": adapter, "model_dir": model_dir}


def copy_adapter(files, tmp_path, name="a"):
    dst = tmp_path / name
    shutil.copytree(files["adapter"], dst)
    return dst


def edit_config(path, **changes):
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def test_peft_fields(files):
    p = Patch.load(files["adapter"])
    q, k, v = (p["model.layers.0.self_attn." + n] for n in ("q_proj", "k_proj", "v_proj"))
    assert (q.rank, q.scale) == (2, 8 / 2)  # rank_pattern
    assert (k.rank, k.scale) == (4, 8 / 4)
    assert (v.rank, v.scale) == (4, 3 / 4)  # alpha_pattern
    assert len(p) == 14 and p.source == "peft"


def test_rslora_scale(files, tmp_path):
    a = copy_adapter(files, tmp_path)
    edit_config(a, use_rslora=True)
    assert Patch.load(str(a))["model.layers.1.mlp.up_proj"].scale == 8 / math.sqrt(4)


def test_round_trip_keeps_everything(files, tmp_path):
    p = Patch.load(files["adapter"])
    p.base_sketches = {"model.layers.0.mlp.up_proj": portllm.fingerprint.sketch(torch.ones(3, 4))}
    p.save(str(tmp_path / "rt"))
    q = Patch.load(str(tmp_path / "rt"))
    assert q.base_sketches == p.base_sketches and q.base_fingerprint == p.base_fingerprint
    for name, m in p.items():
        assert torch.equal(q[name].A, m.A) and torch.equal(q[name].B, m.B)
        assert q[name].scale == pytest.approx(m.scale, rel=1e-15)


def test_save_refuses_to_overwrite(files, tmp_path):
    p = Patch.load(files["adapter"])
    p.save(str(tmp_path / "x"))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        p.save(str(tmp_path / "x"))
    p.save(str(tmp_path / "x"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["x"]


@pytest.mark.parametrize("key,value,match", [
    ("use_dora", True, "DoRA"),
    ("lora_bias", True, "lora_bias"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
    ("bias", "all", "bias='all'"),
    ("peft_type", "IA3", "not a LoRA adapter"),
])
def test_refuses_peft_variants_it_would_merge_wrongly(files, tmp_path, key, value, match):
    a = copy_adapter(files, tmp_path)
    edit_config(a, **{key: value})
    with pytest.raises(PatchFormatError, match=match):
        Patch.load(str(a))


def test_refuses_pickled_adapter_with_conversion_hint(files, tmp_path):
    a = copy_adapter(files, tmp_path)
    os.remove(a / "adapter_model.safetensors")
    (a / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(PatchFormatError, match=r"pickled weights are refused.*save_file"):
        Patch.load(str(a))


def test_truncated_safetensors(files, tmp_path):
    a = copy_adapter(files, tmp_path)
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(PatchFormatError, match="truncated"):
        Patch.load(str(a))
    assert cli.main(["inspect", str(a)]) == 1


def test_missing_factor(files, tmp_path):
    a = copy_adapter(files, tmp_path)
    p = Patch.load(str(a))
    tensors = {}
    for name, m in p.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.A
        if name != "model.layers.1.mlp.down_proj":
            tensors[f"base_model.model.{name}.lora_B.weight"] = m.B
    write_tensors(str(a / "adapter_model.safetensors"), tensors)
    with pytest.raises(PatchFormatError, match="model.layers.1.mlp.down_proj has no lora_B.weight"):
        Patch.load(str(a))


def test_unexpected_tensor_refused(files, tmp_path):
    a = copy_adapter(files, tmp_path)
    p = Patch.load(str(a))
    tensors = {f"base_model.model.{n}.lora_{w}.weight": getattr(m, w) for n, m in p.items() for w in "AB"}
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    write_tensors(str(a / "adapter_model.safetensors"), tensors)
    with pytest.raises(PatchFormatError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        Patch.load(str(a))


def test_mismatched_shapes_name_module_and_shapes(files, tmp_path, capsys):
    other = str(tmp_path / "adapter_h96")
    train_peft_adapter(llama(seed=0, hidden=96), other, steps=1)
    with pytest.raises(portllm.IncompatiblePatchError,
                       match=r"patch module model\.layers\.\d\.\S+ needs a weight of shape \(\d+, \d+\), "
                             r"the model's is \(\d+, \d+\) \(and 13 more\)"):
        portllm.port(files["model_dir"], other, str(tmp_path / "o"), progress=False, log=None)
    assert cli.main(["port", "--model", files["model_dir"], "--patch", other, "--out", str(tmp_path / "o"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("portllm port: error: patch module") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_another_architecture(files, tmp_path):
    gpt2_like = Patch({"transformer.h.0.attn.c_attn": PatchModule(torch.zeros(192, 2), torch.zeros(2, 64), 1.0, True)})
    with pytest.raises(portllm.IncompatiblePatchError, match="no module transformer.h.0.attn.c_attn.*another architecture"):
        portllm.port(files["model_dir"], gpt2_like, str(tmp_path / "o"), progress=False, log=None)
    with pytest.raises(portllm.IncompatiblePatchError):
        portllm.apply_patch(llama(seed=0), gpt2_like)


def test_nan_factors_refused_before_writing(files, tmp_path):
    p = Patch.load(files["adapter"])
    p["model.layers.1.self_attn.o_proj"].A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.o_proj: lora_A has NaN"):
        portllm.port(files["model_dir"], p, str(tmp_path / "o"), progress=False, log=None)
    assert os.listdir(tmp_path) == []


def test_truncated_checkpoint_shard(files, tmp_path):
    bad = tmp_path / "bad_model"
    shutil.copytree(files["model_dir"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert cli.main(["port", "--model", str(bad), "--patch", files["adapter"], "--out", str(tmp_path / "o"),
                     "--quiet"]) == 1
    with pytest.raises(portllm.checkpoint.CheckpointError, match="truncated"):
        portllm.port(str(bad), files["adapter"], str(tmp_path / "o"), progress=False, log=None)


def test_port_onto_itself_refused(files):
    with pytest.raises(ValueError, match="never modifies its input"):
        portllm.port(files["model_dir"], files["adapter"], files["model_dir"], force=True, progress=False, log=None)


def test_inspect(files, capsys):
    assert cli.main(["inspect", files["adapter"]]) == 0
    out = capsys.readouterr().out
    assert "14 modules, ranks [2, 4]" in out and "model.layers.0.self_attn.q_proj" in out
    p = Patch.load(files["adapter"])
    row = next(r for r in p.summary() if r["module"] == "model.layers.0.mlp.up_proj")
    assert row["delta_norm"] == pytest.approx(p["model.layers.0.mlp.up_proj"].delta().norm().item(), rel=1e-5)
