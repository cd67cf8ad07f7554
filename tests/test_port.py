"""Porting a real PEFT adapter onto an evolved model, with the CLI, against PEFT's own merge."""

import hashlib
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import ulp_distance  # noqa: E402
from hf_fixtures import evolve, llama, train_peft_adapter  # noqa: E402

import portllm  # noqa: E402
from portllm import cli  # noqa: E402
from portllm.patch import Patch  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An adapter trained by PEFT on θ, and θ' (evolved, bf16, sharded) saved as a checkpoint."""
    root = tmp_path_factory.mktemp("port")
    adapter = str(root / "adapter")
    base = train_peft_adapter(llama(seed=0), adapter)
    evolved_dir = str(root / "evolved")
    evolved = evolve(llama(seed=0)).to(torch.bfloat16)
    evolved.save_pretrained(evolved_dir, max_shard_size="100KB")
    assert os.path.exists(os.path.join(evolved_dir, "model.safetensors.index.json"))
    return {"root": root, "adapter": adapter, "evolved_dir": evolved_dir, "base": base}


def dir_digest(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def peft_merged(model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def test_cli_port_equals_peft_merge(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    before = dir_digest(setup["evolved_dir"])
    out = str(tmp_path / "ported")
    assert cli.main(["port", "--model", setup["evolved_dir"], "--patch", setup["adapter"], "--out", out,
                     "--device", "cpu", "--quiet"]) == 0
    assert dir_digest(setup["evolved_dir"]) == before, "port must never modify its input"

    ported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    expected = peft_merged(setup["evolved_dir"], setup["adapter"])
    evolved = AutoModelForCausalLM.from_pretrained(setup["evolved_dir"], dtype=torch.bfloat16).state_dict()
    got_sd, exp_sd = ported.state_dict(), expected.state_dict()
    assert set(got_sd) == set(exp_sd)
    n_changed = 0
    for k, exp in exp_sd.items():
        assert got_sd[k].dtype == exp.dtype == torch.bfloat16, k
        assert ulp_distance(got_sd[k], exp).max().item() <= 1, k
        if not torch.equal(got_sd[k], evolved[k]):
            n_changed += 1
            assert "proj" in k, k
    assert n_changed == 2 * 7, "every patched projection, and nothing else, changed"
    assert json.load(open(os.path.join(out, "portllm_port.json")))["patch_modules"] == 14


def test_port_reports_base_and_evolved(setup, tmp_path):
    patch = Patch.load(setup["adapter"])
    rep = portllm.check_compatibility(setup["evolved_dir"], patch)
    assert rep.ok and len(rep.matched) == 14 and rep.is_base is None  # PEFT adapters carry no fingerprint
    patch.base_sketches = {n: portllm.fingerprint.sketch(setup["base"].get_submodule(n).weight) for n in patch}
    assert portllm.check_compatibility(setup["base"], patch).is_base is True
    rep = portllm.check_compatibility(setup["evolved_dir"], patch)
    assert rep.is_base is False and 0.02 < rep.mean_relative_change < 0.1  # evolved by 5%
    assert "another model (evolved)" in str(rep)


def test_apply_patch_in_memory_equals_port(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "ported")
    portllm.port(setup["evolved_dir"], setup["adapter"], out, device="cpu", progress=False, log=None)
    model = AutoModelForCausalLM.from_pretrained(setup["evolved_dir"], dtype=torch.bfloat16)
    portllm.apply_patch(model, Patch.load(setup["adapter"]))
    ported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for (k, a), (_, b) in zip(model.state_dict().items(), ported.state_dict().items()):
        assert torch.equal(a, b), k


def test_scale_dtype_and_several_patches(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    patch = Patch.load(setup["adapter"])
    out = str(tmp_path / "ported32")
    portllm.port(setup["evolved_dir"], patch, out, scale=0.5, dtype="float32", device="cpu", progress=False, log=None)
    ported = AutoModelForCausalLM.from_pretrained(out)
    assert json.load(open(os.path.join(out, "config.json"))).get("dtype", "float32") == "float32"
    model = AutoModelForCausalLM.from_pretrained(setup["evolved_dir"], dtype=torch.float32)
    # task arithmetic: 0.25·Δ + 0.25·Δ in one pass == 0.5·Δ
    portllm.apply_patch(model, [patch, patch], scale=[0.25, 0.25])
    for (k, a), (_, b) in zip(model.state_dict().items(), ported.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    portllm.remove_patch(model, patch, 0.5)
    evolved = AutoModelForCausalLM.from_pretrained(setup["evolved_dir"], dtype=torch.float32)
    for (k, a), (_, b) in zip(model.state_dict().items(), evolved.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_portllm_saved_patch_loads_in_peft(setup, tmp_path):
    from peft import PeftModel

    saved = str(tmp_path / "resaved")
    Patch.load(setup["adapter"]).save(saved)
    assert Patch.load(saved).source == "peft"
    ref = PeftModel.from_pretrained(llama(seed=0), setup["adapter"]).merge_and_unload()
    ours = PeftModel.from_pretrained(llama(seed=0), saved).merge_and_unload()
    for (k, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert torch.equal(a, b), k


def test_existing_out_dir_refused_then_forced(setup, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["port", "--model", setup["evolved_dir"], "--patch", setup["adapter"], "--out", str(out), "--quiet"]
    assert cli.main(args) == 1
    assert (out / "keep.txt").read_text() == "user data"
    assert cli.main(args + ["--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_interrupted_port_leaves_nothing(setup, tmp_path, monkeypatch):
    from portllm import safetensors_io

    calls = {"n": 0}
    real = safetensors_io.SafetensorsWriter._advance  # every write, whole, in parts or copied, goes through it

    def failing(self, name, n):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, n)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "_advance", failing)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        portllm.port(setup["evolved_dir"], setup["adapter"], str(out), device="cpu", progress=False, log=None)
    assert not out.exists()
    assert os.listdir(tmp_path) == [], "no temporary directory may be left behind"


def test_gpt2_fan_in_fan_out(tmp_path):
    """GPT-2's Conv1D stores weights [in, out]: PEFT's fan_in_fan_out adapters merge transposed."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hf_fixtures import evolve

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    peft_model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                                 fan_in_fan_out=True, lora_dropout=0.0))
    tokens = torch.randint(0, 100, (2, 12))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    evolved = evolve(GPT2LMHeadModel(cfg))
    evolved.save_pretrained(tmp_path / "evolved")
    (tmp_path / "evolved" / "tokenizer.json").write_text("{}")
    portllm.port(str(tmp_path / "evolved"), str(tmp_path / "adapter"), str(tmp_path / "out"), progress=False, log=None)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    ported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "evolved"),
                                         str(tmp_path / "adapter")).merge_and_unload()
    for (k, a), (_, b) in zip(ported.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ported.transformer.h[0].attn.c_attn.weight, evolved.transformer.h[0].attn.c_attn.weight)
