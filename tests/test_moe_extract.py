"""extract_patch on mixture-of-experts models: a full fine-tune of fused expert weights becomes an
expert LoRA per expert (batched SVD over the experts) in PEFT's target_parameters format, which PEFT
loads and merges back into the fine-tune, and which portllm applies and ports the same way."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from test_moe import assert_close_rel, build  # noqa: E402

import portllm  # noqa: E402
from portllm import cli  # noqa: E402
from portllm.patch import Patch  # noqa: E402

EXPERTS = ("gate_up_proj", "down_proj")


def finetune(base, ranks=(2, 1, 2, 2), seed=7, attention=True):
    """A 'full fine-tune': expert e of every expert parameter moved by an exact rank ranks[e] update
    (fused [E, out, in], or [E, in, out] where the experts are transposed), and o_proj by rank 2."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() == 3 and leaf in EXPERTS:
                for e in range(p.shape[0]):
                    r = ranks[e % len(ranks)]
                    p[e] += 0.05 * torch.randn(p.shape[1], r, generator=g) @ torch.randn(r, p.shape[2], generator=g)
            elif attention and name.endswith("o_proj.weight"):
                p += 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g)
    return ft


def peft_merge(base, adapter_dir):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_extract_from_models_round_trips_through_peft(family, tmp_path):
    """Rank 2 recovers every expert's update (GPT-OSS: transposed experts); the saved adapter is
    PEFT's target_parameters format: PEFT's merge_and_unload of it gives back the fine-tune, and
    portllm's apply_patch gives the same weights."""
    base = build(family)
    ft = finetune(base)
    patch = portllm.extract_patch(base, ft, rank=2, device="cpu")
    assert patch.expert_factors and patch.expert_config["target_parameters"]
    assert min(patch.extra["energy_kept"].values()) >= 1 - 1e-5
    assert len([k for k in patch.extra["energy_kept"] if k.endswith("]")]) == 2 * 2 * 4  # layers, params, experts
    patch.save(tmp_path / "p")
    want = ft.state_dict()
    assert_close_rel(peft_merge(base, tmp_path / "p").state_dict(), want, rtol=2e-5)
    got = portllm.apply_patch(copy.deepcopy(base), Patch.load(tmp_path / "p"))
    assert_close_rel(got.state_dict(), want, rtol=2e-5)


def test_extract_from_checkpoints_per_expert_on_disk(tmp_path):
    """From checkpoint directories whose experts are stored one tensor per expert and projection: the
    same expert LoRA as from the models (the experts' 2-D tensors are not extracted again as plain
    modules), and porting it onto the base checkpoint gives the fine-tune."""
    base = build("qwen3_moe")
    ft = finetune(base)
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    ft.save_pretrained(tmp_path / "ft", max_shard_size="20KB")
    on_disk = portllm.extract_patch(str(tmp_path / "base"), str(tmp_path / "ft"), rank=2, device="cpu")
    in_memory = portllm.extract_patch(base, ft, rank=2, device="cpu")
    assert not [n for n in on_disk.modules if ".experts." in n]
    assert sorted(on_disk.modules) == sorted(in_memory.modules)
    assert sorted(on_disk.expert_factors) == sorted(in_memory.expert_factors)
    on_disk.save(tmp_path / "p")
    portllm.port(str(tmp_path / "base"), str(tmp_path / "p"), str(tmp_path / "out"), progress=False, log=None)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_close_rel(got.state_dict(), ft.state_dict(), rtol=2e-5)


def test_energy_rank_is_the_largest_any_expert_needs(tmp_path):
    """energy=1: experts of rank 1 and 2 share one rank per parameter, 2 (zero-padded for the rank-1
    experts), every expert keeps all of its update; an untouched expert parameter is left out."""
    base = build("qwen3_moe")
    ft = finetune(base, ranks=(1, 1, 2, 1), attention=False)
    with torch.no_grad():
        ft.model.layers[1].mlp.experts.down_proj.copy_(base.model.layers[1].mlp.experts.down_proj)
    patch = portllm.extract_patch(base, ft, energy=1.0 - 1e-6, device="cpu")
    assert not patch.modules
    params = patch.expert_config["target_parameters"]
    assert "model.layers.1.mlp.experts.down_proj" not in params and len(params) == 3
    assert patch.expert_config["r"] == 2 and all(f.A.shape[0] == 4 * 2 for f in patch.expert_factors.values())
    assert min(patch.extra["energy_kept"].values()) >= 1 - 1e-5
    patch.save(tmp_path / "p")
    assert_close_rel(peft_merge(base, tmp_path / "p").state_dict(), ft.state_dict(), rtol=2e-5)


def test_cli_extract_experts(tmp_path, capsys):
    base = build("qwen3_moe")
    ft = finetune(base, attention=False)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    assert cli.main(["extract", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--rank", "2",
                     "--out", str(tmp_path / "p"), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 expert parameters" in out and "16 experts" in out
    assert cli.main(["inspect", str(tmp_path / "p")]) == 0
    assert "mixture-of-experts" in capsys.readouterr().out


def test_compatibility_report_per_expert(tmp_path):
    """The port's report names the expert parameters, says every expert was found, and gives each
    expert's ‖ΔW‖_F, equal to the norm of the update PEFT merges."""
    from test_moe import adapter

    model = build("qwen3_moe")
    pm = adapter(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "base")
    lines = []
    portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=lines.append)
    line = next(x for x in lines if "mixture of experts" in x)
    assert "LoRA on 4 expert parameters, all 16 experts found" in line
    report = portllm.check_compatibility(model, Patch.load(tmp_path / "a").for_model(model))
    merged = pm.merge_and_unload()
    name = "model.layers.1.mlp.experts.gate_up_proj"
    want = [float((merged.get_parameter(name)[e] - model.get_parameter(name)[e]).double().norm()) for e in range(4)]
    torch.testing.assert_close(torch.tensor(report.expert_norms[name]), torch.tensor(want), rtol=1e-5, atol=0)
    assert f"{max(v for vs in report.expert_norms.values() for v in vs):.4g} (largest" in line
