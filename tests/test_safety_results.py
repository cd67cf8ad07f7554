"""No silent wrong results: NaN/Inf scales and factors, merges that overflow the weight's dtype,
PEFT variants whose merge is not W + s·B·A, overlapping W. Each refusal names the thing at fault and
leaves the inputs (files or weights) unchanged."""

import json
import math
import os

import pytest
import torch
from safety_fixtures import MODULES, make_checkpoint, make_patch, snapshot

import portllm
from portllm import cli, ops
from portllm.merge import NonFiniteMergeError, merge_into
from portllm.patch import PatchFormatError, PatchModule


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def world(tmp_path):
    model = tmp_path / "model"
    make_checkpoint(model, dtype=torch.float16)
    patch = tmp_path / "patch"
    make_patch().save(str(patch))
    return tmp_path, str(model), str(patch)


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_cli_scale_not_finite(world, capsys, scale):
    root, model, patch = world
    before = snapshot(str(root))
    code, err = run_cli(capsys, "port", "--model", model, "--patch", patch, "--out", str(root / "out"),
                        f"--scale={scale}", "--device", "cpu", "--quiet")
    assert code == 1 and "scale must be a finite number" in err
    assert snapshot(str(root)) == before


@pytest.mark.parametrize("alpha", ["NaN", "Infinity"])
def test_lora_alpha_not_finite(world, capsys, alpha):
    root, model, patch = world
    cfg_path = os.path.join(patch, "adapter_config.json")
    with open(cfg_path) as f:
        text = f.read()
    cfg = json.loads(text)
    text = text.replace(f'"lora_alpha": {json.dumps(cfg["lora_alpha"])}', f'"lora_alpha": {alpha}')
    with open(cfg_path, "w") as f:
        f.write(text)
    before = snapshot(str(root))
    code, err = run_cli(capsys, "port", "--model", model, "--patch", patch, "--out", str(root / "out"),
                        "--device", "cpu", "--quiet")
    assert code == 1 and "lora_alpha must be a finite number" in err and "adapter_config.json" in err
    assert snapshot(str(root)) == before


def test_fp16_overflow_is_refused_by_port(world, capsys):
    root, model, _ = world
    big = root / "big"
    make_patch(scale=1e6).save(str(big))
    before = snapshot(str(root))
    code, err = run_cli(capsys, "port", "--model", model, "--patch", str(big), "--out", str(root / "out"),
                        "--device", "cpu", "--quiet")
    assert code == 1 and "NaN or Inf" in err and MODULES[0] in err or "module model.layers" in err
    assert snapshot(str(root)) == before, "nothing written"


def test_fp16_overflow_is_refused_by_apply_patch_and_the_model_is_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24, bias=False), torch.nn.Linear(40, 24, bias=False)).half()
    before = [p.detach().clone() for p in model.parameters()]
    p = make_patch(modules=["0", "1"], scale=1.0)
    p.modules["1"] = PatchModule(p["1"].B, p["1"].A, 1e7)  # only the second module overflows
    with pytest.raises(NonFiniteMergeError, match="module 1: the merge would make"):
        portllm.apply_patch(model, p)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "all or nothing"
    portllm.apply_patch(model, p, check_finite=False)  # the user's explicit opt-out
    assert not torch.isfinite(model[1].weight).all()


def test_merge_into_nan_factor_names_the_module():
    W = torch.randn(8, 6)
    W0 = W.clone()
    m = PatchModule(torch.randn(8, 2), torch.randn(2, 6), 1.0)
    m.A[1, 3] = float("nan")
    with pytest.raises(NonFiniteMergeError, match="module q: A"):
        merge_into(W, [(m, 1.0)], name="q")
    assert torch.equal(W, W0)
    with pytest.raises(NonFiniteMergeError, match="module q: scale"):
        merge_into(W, [(PatchModule(torch.randn(8, 2), torch.randn(2, 6), math.inf), 1.0)], name="q")


def test_merge_into_keeps_weights_that_were_already_inf():
    W = torch.randn(8, 6, dtype=torch.float16)
    W[0, 0] = float("inf")
    merge_into(W, [(PatchModule(torch.randn(8, 2) * 0.1, torch.randn(2, 6) * 0.1, 1.0), 1.0)])
    assert torch.isinf(W[0, 0]) and torch.isfinite(W.flatten()[1:]).all()


def _edit_adapter(patch, cfg_update=None, rename=None):
    if cfg_update:
        p = os.path.join(patch, "adapter_config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg.update(cfg_update)
        with open(p, "w") as f:
            json.dump(cfg, f)
    if rename:
        from portllm.safetensors_io import SafetensorsReader, write_tensors

        w = os.path.join(patch, "adapter_model.safetensors")
        with SafetensorsReader(w) as rd:
            t = {rename(k): rd[k] for k in rd.keys()}
        write_tensors(w, t)


@pytest.mark.parametrize("case,edit,message", [
    ("alora", dict(cfg_update={"alora_invocation_tokens": [5, 6]}), "aLoRA"),
    ("two adapters", dict(rename=lambda k: k.replace(".weight", ".other.weight") if "layers.0" in k else k),
     "holds the factors of 2 adapters"),
    ("r zero", dict(cfg_update={"r": 0}), "r must be a positive integer, got 0"),
    ("r null", dict(cfg_update={"r": None}), "r must be a positive integer, got None"),
    ("bad regex", dict(cfg_update={"rank_pattern": {"(": 4}}), "rank_pattern: '(' is not a valid regular expression"),
    ("alpha pattern nan", dict(cfg_update={"alpha_pattern": {"q_proj": float("nan")}}),
     "alpha_pattern value for model.layers.0.self_attn.q_proj must be a finite number"),
])
def test_patch_variants_refused(world, capsys, case, edit, message):
    root, model, patch = world
    _edit_adapter(patch, **edit)
    before = snapshot(str(root))
    code, err = run_cli(capsys, "port", "--model", model, "--patch", patch, "--out", str(root / "out"),
                        "--device", "cpu", "--quiet")
    assert code == 1 and message in err and "\n" not in err, err
    assert snapshot(str(root)) == before
    with pytest.raises(PatchFormatError):
        portllm.Patch.load(patch)


def test_fan_in_fan_out_on_linear_follows_peft():
    """PEFT ignores fan_in_fan_out on nn.Linear: W += s·B·A, not its transpose."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    W0 = model[0].weight.detach().clone()
    B, A = torch.randn(16, 2), torch.randn(2, 16)
    p = portllm.Patch({"0": PatchModule(B, A, 0.5, fan_in_fan_out=True)})
    portllm.apply_patch(model, p)
    torch.testing.assert_close(model[0].weight.detach(), W0 + 0.5 * B @ A)


def test_fan_in_fan_out_square_in_a_checkpoint_of_unknown_type_is_refused(tmp_path, capsys):
    model = tmp_path / "m"
    make_checkpoint(model, shape=(24, 24))
    p = make_patch(shape=(24, 24))
    for m in p.modules.values():
        m.fan_in_fan_out = True
    p.save(str(tmp_path / "p"))
    before = snapshot(str(tmp_path))
    code, err = run_cli(capsys, "port", "--model", str(model), "--patch", str(tmp_path / "p"), "--out",
                        str(tmp_path / "o"), "--device", "cpu", "--quiet")
    assert code == 1 and "cannot tell which way to merge" in err
    assert snapshot(str(tmp_path)) == before


def test_overlapping_W_is_refused():
    base = torch.randn(100)
    W = base.as_strided((6, 5), (2, 1))  # rows overlap
    with pytest.raises(ValueError, match="share memory"):
        ops.patch_add_(W, torch.randn(6, 2), torch.randn(2, 5))
    ok = base.as_strided((6, 5), (5, 1))  # a plain view: fine
    ops.patch_add_(ok, torch.randn(6, 2), torch.randn(2, 5))
