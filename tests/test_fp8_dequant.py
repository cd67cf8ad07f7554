"""``--dtype bfloat16`` (dtype=) from a block-FP8 checkpoint: a dequantized 16-bit checkpoint, each FP8
weight dequantized with its block scales, the patch merged in fp32 and rounded once, the scale tensors
and the quantization_config dropped; transformers loads it as a plain bf16 model."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from test_fp8 import BLOCK, _fp8_checkpoint, _patch  # noqa: E402

import portllm  # noqa: E402
from portllm import fp8  # noqa: E402


@pytest.mark.parametrize("sharded", [False, True])
def test_dtype_bfloat16_writes_a_dequantized_checkpoint(tmp_path, sharded):
    from safetensors.torch import load_file, save_file

    sd = _fp8_checkpoint(tmp_path / "m")
    if sharded:  # two shards and an index, the scales of one weight in the other shard
        keys = sorted(sd)
        half = {k: sd[k] for k in keys[::2]}, {k: sd[k] for k in keys[1::2]}
        (tmp_path / "m" / "model.safetensors").unlink()
        wm = {}
        for i, part in enumerate(half):
            name = f"model-0000{i + 1}-of-00002.safetensors"
            save_file(part, str(tmp_path / "m" / name), metadata={"format": "pt"})
            wm.update({k: name for k in part})
        (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    patch = _patch()
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), dtype="bfloat16", progress=False, log=None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # inputs untouched
    out = {}
    for f in (tmp_path / "o").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert not [k for k in out if k.endswith("_scale_inv")]
    assert set(out) == {k for k in sd if not k.endswith("_scale_inv")}
    for k, v in out.items():
        assert v.dtype == torch.bfloat16, k
        name = k.removesuffix(".weight")
        if k + "_scale_inv" in sd:
            W = fp8.dequantize(sd[k], sd[k + "_scale_inv"], BLOCK)
            if name in patch.modules:  # W + ΔW in fp32, one rounding to bf16
                m = patch[name]
                W = W + m.scale * (m.B.float() @ m.A.float())
                err = (v.double() - W.double()).abs()
                ulp = W.abs().double() * 2.0 ** -8  # at most half a bf16 ulp plus the fp32 sum's rounding
                assert bool((err <= ulp + 1e-12).all()), k
            else:
                assert torch.equal(v, W.to(torch.bfloat16)), k
        else:
            assert torch.equal(v, sd[k]), k
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    if sharded:
        index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(out)
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert model.state_dict()["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[k], out[k])


def test_dtype_float8_is_refused(tmp_path):
    _fp8_checkpoint(tmp_path / "m")
    with pytest.raises(ValueError, match="portllm writes bfloat16, float16 or float32"):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), dtype=torch.float8_e4m3fn, progress=False,
                     log=None)
    assert not (tmp_path / "o").exists()
