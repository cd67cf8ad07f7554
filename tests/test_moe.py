"""Mixture-of-experts patches: PEFT adapters with ``target_parameters`` on fused expert weights, ported
onto checkpoints and applied to models exactly as PEFT merges them (portllm.experts).

Each family is a tiny random model built from its transformers config; the adapter is PEFT's own
(``get_peft_model`` with ``target_parameters``, random factors, ``save_pretrained``), and the oracle
is PEFT's ``merge_and_unload`` of that adapter."""

import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import portllm  # noqa: E402
from portllm.patch import Patch  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
              max_position_embeddings=64)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=8, num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=24, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, head_dim=16)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                             first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                     layer_types=["full_attention", "full_attention"])),
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(family: str, seed: int = 0, dtype=torch.float32):
    cls, kw = FAMILIES[family]
    cfg = getattr(transformers, cls)(**COMMON, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # experts are initialised to zero in some families: random, never zero
            p.normal_(0, 0.05)
    return model.to(dtype)


def adapter(model, path, *, target_modules=("o_proj",), targets=EXPERTS, r=2, alpha=8, seed=1, **kw):
    """PEFT's adapter on a copy of ``model``, random factors, saved to ``path``; returns the PeftModel."""
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=tm, target_parameters=list(targets), **kw)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:  # fp32 factors, as PEFT trains and saves adapters (autocast_adapter_dtype)
                p.data = (torch.randn(p.shape, generator=g) * 0.2).to(torch.float32)
    pm.save_pretrained(path)
    return pm


def assert_close_rel(got: dict, want: dict, rtol=1e-6):
    assert got.keys() == want.keys()
    for k in want:
        a, b = got[k].double(), want[k].double()
        err = (a - b).abs().max().item()
        assert err <= rtol * max(b.abs().max().item(), 1e-30), (k, err)


def assert_port_and_apply_equal(model, tmp_path, want):
    """The adapter at tmp_path/a, ported onto the checkpoint at tmp_path/base and applied to ``model``,
    gives ``want`` (PEFT's merge) both ways."""
    portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=None)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert_close_rel(got, want)
    portllm.apply_patch(model, Patch.load(tmp_path / "a"))
    assert_close_rel(model.state_dict(), want)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def test_apply_patch_equals_peft_merge(family, tmp_path):
    """apply_patch on the fused parameters in memory equals PEFT's merge_and_unload; remove_patch undoes it
    (exactly with exact=True)."""
    model = build(family)
    pm = adapter(model, tmp_path / "a")
    want = pm.merge_and_unload().state_dict()
    patch = Patch.load(tmp_path / "a")
    assert patch.expert_factors and "expert parameters" in repr(patch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    portllm.apply_patch(model, patch)
    assert_close_rel(model.state_dict(), want)
    changed = [k for k in want if not torch.equal(before[k], want[k])]
    assert any("experts.gate_up_proj" in k for k in changed) and any("experts.down_proj" in k for k in changed)
    portllm.remove_patch(model, patch)
    assert_close_rel(model.state_dict(), before, rtol=1e-5)
    exact = build(family, dtype=torch.bfloat16)
    orig = {k: v.clone() for k, v in exact.state_dict().items()}
    portllm.apply_patch(exact, patch, exact=True)
    portllm.remove_patch(exact, patch)
    assert all(torch.equal(exact.state_dict()[k], v) for k, v in orig.items())


def test_port_equals_peft_merge(family, tmp_path):
    """The streaming port onto a sharded checkpoint (experts split across shards, on-disk names as
    transformers saves them) loads with from_pretrained and equals PEFT's merge, logits too."""
    model = build(family)
    pm = adapter(model, tmp_path / "a")
    merged = pm.merge_and_unload()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "base") if f.endswith(".safetensors")]) > 2
    res = portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=None)
    assert res.merged > 0
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_close_rel(got.state_dict(), merged.state_dict())
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _ordered(t):  # bf16 bit patterns as integers in the order of the values (one apart = one ulp)
    i = t.view(torch.int16).int()
    return torch.where(i < 0, -(i & 0x7FFF), i)


def test_bf16_port_is_one_rounding_of_the_exact_sum(tmp_path):
    """bf16 Qwen3-MoE with fp32 factors: every merged element is round(W + ΔW) of the exact sum (fp64
    reference, one rounding to bf16), or one ulp off it on at most 0.1% of elements. PEFT rounds ΔW to
    bf16 before adding it (``get_delta_weight`` casts to the parameter's dtype): a second rounding, so
    its result is held to that bound instead, |ours - PEFT's| <= ulp(ΔW) + ulp(W + ΔW)."""
    model = build("qwen3_moe", dtype=torch.bfloat16)
    pm = adapter(model, tmp_path / "a")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft_merged = pm.merge_and_unload().state_dict()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=None)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    patch = Patch.load(tmp_path / "a").for_model(build("qwen3_moe", dtype=torch.bfloat16))
    total = off = 0
    seen = set()
    for name, m in patch.items():
        key = name[: name.index("[")] if name.endswith("]") else name + ".weight"
        W = base[key]
        delta = m.scale * (m.B.double() @ m.A.double())
        if name.endswith("]"):
            e = int(name[name.index("[") + 1:-1])
            W, g, pw = W[e], got[key][e], peft_merged[key][e]
        else:
            g, pw = got[key], peft_merged[key]
        want = (W.double() + delta).to(torch.bfloat16)
        d = (_ordered(g) - _ordered(want)).abs()
        assert int(d.max()) <= 1, name
        total, off = total + d.numel(), off + int((d > 0).sum())
        ulp = lambda t: torch.finfo(torch.bfloat16).eps * t.double().abs()  # noqa: E731
        assert bool(((g.double() - pw.double()).abs() <= ulp(delta) + ulp(pw) + 1e-30).all()), name
        seen.add(key)
    assert any("experts.gate_up_proj" in k for k in seen) and any("o_proj" in k for k in seen)
    assert off <= 0.001 * total, (off, total)


def test_mixed_adapter_rank_and_alpha_patterns(tmp_path):
    """Attention and experts in one adapter, rank_pattern and alpha_pattern on one expert parameter."""
    model = build("qwen3_moe")
    pm = adapter(model, tmp_path / "a", target_modules=("q_proj", "o_proj"), rank_pattern={"gate_up_proj": 3},
                 alpha_pattern={"down_proj": 5})
    want = pm.merge_and_unload().state_dict()
    portllm.apply_patch(model, Patch.load(tmp_path / "a"))
    assert_close_rel(model.state_dict(), want)


def test_save_round_trips_through_peft(tmp_path):
    """A patch with expert LoRA, patterns and plain modules, scaled, saved by portllm: PEFT loads it and
    merges exactly what portllm applies."""
    model = build("qwen3_moe")
    adapter(model, tmp_path / "a", target_modules=("q_proj", "o_proj"), rank_pattern={"gate_up_proj": 3, "q_proj": 1},
            alpha_pattern={"down_proj": 5, "o_proj": 3})
    patch = Patch.load(tmp_path / "a").scaled(0.5)
    patch.save(tmp_path / "copy")
    want = portllm.apply_patch(copy.deepcopy(model), patch).state_dict()
    got = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "copy").merge_and_unload().state_dict()
    assert_close_rel(got, want)
    assert not torch.equal(want["model.layers.0.mlp.experts.down_proj"], model.model.layers[0].mlp.experts.down_proj)


def test_refusals_name_the_tensor_and_leave_inputs(tmp_path):
    model = build("qwen3_moe")
    adapter(model, tmp_path / "a")
    patch = Patch.load(tmp_path / "a")
    cls, kw = FAMILIES["qwen3_moe"]
    fewer = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, cls)(**COMMON, **dict(kw, num_experts=2))).eval()
    with pytest.raises(portllm.IncompatiblePatchError, match=r"experts\.(gate_up|down)_proj.*2 experts"):
        portllm.apply_patch(fewer, patch)
    model.save_pretrained(tmp_path / "base")
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "base" / "model.safetensors")
    del sd["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(sd, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    listing = sorted(os.listdir(tmp_path / "base"))
    with pytest.raises(portllm.IncompatiblePatchError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=None)
    assert not os.path.exists(tmp_path / "out") and sorted(os.listdir(tmp_path / "base")) == listing


def test_unknown_nesting_refused(tmp_path):
    """A factor pair nested deeper than the module has targeted parameters is refused, by key."""
    model = build("qwen3_moe")
    adapter(model, tmp_path / "a", targets=["mlp.experts.down_proj"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    sd = {k.replace("experts.lora_", "experts.base_layer.lora_"): v for k, v in sd.items()}
    save_file(sd, tmp_path / "a" / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(portllm.IncompatiblePatchError, match=r"experts\.base_layer\.lora_A\.weight.*nested 1 deep"):
        portllm.apply_patch(model, Patch.load(tmp_path / "a"))


def test_inspect_and_serve(tmp_path, capsys):
    """inspect lists the expert factors; serve.attach refuses expert LoRA in one line naming it."""
    from portllm import cli, serve

    model = build("qwen3_moe")
    adapter(model, tmp_path / "a")
    assert cli.main(["inspect", str(tmp_path / "a"), "--full"]) == 0
    out = capsys.readouterr().out
    assert "mixture-of-experts parameters" in out and "model.layers.1.mlp.experts.base_layer: lora_A (8, 32)" in out
    with pytest.raises(serve.ServeError, match=r"patch 'a': .*mixture-of-experts parameters \(model\.layers\.0"):
        serve.attach(model, {"a": str(tmp_path / "a")})
    assert not any(type(m).__name__ == "PatchedLinear" for m in model.modules())


def test_deepseek_shared_and_routed_experts(tmp_path):
    """DeepSeek-V3: LoRA on the shared experts (plain Linear modules) and on the routed experts (fused
    parameters) in one adapter, ported and applied as PEFT merges them."""
    model = build("deepseek_v3")
    # Through target_parameters: PEFT 0.21 rewrites target_modules naming gate/up/down_proj into the routed
    # experts' fused parameters (and refuses up_proj alone), so the shared experts are reached as parameters.
    pm = adapter(model, tmp_path / "a", targets=EXPERTS + ["mlp.shared_experts.up_proj.weight"])
    want = pm.merge_and_unload().state_dict()
    base = model.state_dict()
    assert not torch.equal(want["model.layers.0.mlp.shared_experts.up_proj.weight"],
                           base["model.layers.0.mlp.shared_experts.up_proj.weight"])
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert_port_and_apply_equal(model, tmp_path, want)


def test_fused_checkpoint_tensor_is_one_batched_merge(tmp_path, monkeypatch):
    """GPT-OSS stores its experts fused ([E, in, out]): each such tensor is merged in one patch_add_experts_
    call (on its transposed view), with the same result as PEFT's merge."""
    from portllm import ops

    model = build("gpt_oss")
    pm = adapter(model, tmp_path / "a")
    want = pm.merge_and_unload().state_dict()
    model.save_pretrained(tmp_path / "base")
    calls = []
    real = ops.patch_add_experts_
    monkeypatch.setattr(ops, "patch_add_experts_", lambda W, *a, **kw: calls.append(tuple(W.shape)) or real(W, *a, **kw))
    portllm.port(str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "out"), progress=False, log=None)
    assert sorted(calls) == [(4, 32, 24)] * 2 + [(4, 48, 32)] * 2, calls  # [E, out, in] views of [E, in, out]
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert_close_rel(got, want)


def test_peft_trained_adapter(tmp_path):
    """An adapter trained a few steps with PEFT (AdamW, a causal-LM loss) on a tiny Qwen3-MoE, not only
    random factors: ported and applied as PEFT merges it."""
    model = build("qwen3_moe")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=EXPERTS)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = [p for n, p in pm.named_parameters() if "lora_B" in n and "experts" in n]
    assert trained and all(bool(p.abs().sum() > 0) for p in trained)  # PEFT starts B at zero: it moved
    pm.eval()
    pm.save_pretrained(tmp_path / "a")
    want = pm.merge_and_unload().state_dict()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    assert_port_and_apply_equal(model, tmp_path, want)
