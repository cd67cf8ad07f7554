"""NVFP4 (compressed-tensors' nvfp4-pack-quantized, llm-compressor's NVFP4 releases): the merge against an
fp64 oracle written here from the definition (``portllm.nvfp4``'s docstring) and against compressed-tensors'
own quantizer bit for bit, what survives each rounding, and the port into an NVFP4 checkpoint end to end:
loaded by ``from_pretrained`` (compressed-tensors decompressing on the CPU), its logits those of the
oracle's weights. The oracle rounds onto the e2m1 grid by distance (ties to the even code)."""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch

import portllm
from portllm import nvfp4
from portllm.fp8 import random_bits, stream_key

E4M3 = torch.float8_e4m3fn
GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


# -- the oracle --------------------------------------------------------------------------------------
def o_codes(x, stochastic, key, index):
    a = x.abs()
    if stochastic:
        low = (a[..., None] >= torch.cat([GRID, torch.tensor([math.inf])])[1:]).sum(-1).clamp(max=7)
        hi = (low + 1).clamp(max=7)
        step = torch.where(low < 7, GRID[hi] - GRID[low], torch.ones_like(a))
        t = torch.floor((a - GRID[low]) / step * 2.0 ** 20).long()
        mag = torch.where(low < 7, low + ((t + random_bits(index, key)) >= 2 ** 20).long(), low)
    else:
        dist = (a[..., None] - GRID).abs()
        cand = dist == dist.amin(-1, keepdim=True)
        mag = (cand.long() * (2 - torch.arange(8) % 2)).argmax(-1)  # a tie goes to the even code
    return mag + 8 * (x < 0).long()  # (−0 gives code 0)


def o_step(scale, g):
    """d = fl32(s / g): the exact quotient rounded once to fp32."""
    return (scale.float().double() / g.double()).float().double()


def o_dequant(packed, scale, g):
    b = packed.long()
    c = torch.stack([b % 16, b // 16], -1).reshape(packed.shape[0], -1)
    v = torch.cat([GRID, -GRID])[c].reshape(packed.shape[0], -1, 16)
    return (v * o_step(scale, g)[..., None]).float().double().reshape(packed.shape[0], -1)  # fl32(v·d)


def o_scales(amax32, g):
    """e4m3(clamp(fl32(g · fl32(amax/6)), ±448)), a zero scale 0.125."""
    s = (g.double() * (amax32.double() / 6).float().double()).float()
    s = s.clamp(-448, 448).to(E4M3)
    return torch.where(s.float() == 0, 0.125, s.float()).to(E4M3)


def oracle(packed, scale, g, Bs, A, fresh, stochastic, key):
    """(packed', scale', g', sums [2, 3], clipped groups)."""
    M = packed.shape[0]
    W = o_dequant(packed, scale, g)
    acc = W.clone()
    for k in range(Bs.shape[1]):
        acc = acc + Bs[:, k:k + 1].double() * A[k:k + 1].double()
    W1 = acc.float()
    amax = W1.reshape(M, -1, 16).abs().amax(-1)
    clipped = torch.zeros(amax.shape, dtype=torch.bool)
    if fresh:
        # compressed-tensors' 448·6 / amax is a Python float over a tensor: torch's reciprocal, then a product
        recip = (1 / torch.tensor(max(float(W1.abs().max()), 2.0 ** -126), dtype=torch.float64)).float()
        g = (recip.double() * 2688).float().reshape(1)
        sc = o_scales(amax, g)
    else:
        clipped = (amax.double() / o_step(scale, g)).float() >= 7
        sc = torch.where(clipped, o_scales(amax, g).float(), scale.float()).to(E4M3)
    x = (W1.double().reshape(M, -1, 16) / o_step(sc, g)[..., None]).float().double()  # fl32(W'/d)
    index = torch.arange(W1.numel()).reshape(x.shape)
    sums, out = [], None
    for st in (stochastic, not stochastic):
        c = o_codes(x, st, key, index).reshape(M, -1)
        p = (c[:, 0::2] + 16 * c[:, 1::2]).to(torch.uint8)
        out = p if out is None else out
        moved, delta = o_dequant(p, sc, g) - W, W1.double() - W
        sums.append([float((moved * delta).sum()), float((delta * delta).sum()), float(((moved - delta) ** 2).sum())])
    return out, sc, g, sums, clipped


def quantized(W):
    """fp32 W in NVFP4 as compressed-tensors' quantizer writes it (``nvfp4``'s fresh policy)."""
    g = nvfp4.global_scale_for(W.abs().max())
    sc = nvfp4.group_scales(W.reshape(W.shape[0], -1, 16).abs().amax(-1), g)
    return nvfp4.quantize(W, sc, g), sc, g


def random_weight(M, N, r, seed, rel=0.01, big_rows=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g) * 0.05
    W[M // 2, :16] = 0  # a group of zeros: scale 0.125, any update leaves its range
    packed, sc, gs = quantized(W)
    B, A = torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)
    Bs = B * (rel * 0.05 / float((B @ A).pow(2).mean().sqrt()))
    Bs[:big_rows] *= 30  # updates of 30% in those rows: some groups no longer fit their scales
    return packed, sc, gs, Bs, A


def _ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make installs it "
                               "from requirements-lock.txt): the checks against its quantizer and loader need it")


# -- the merge ---------------------------------------------------------------------------------------
def test_quantizer_and_dequantizer_are_compressed_tensors():
    _ct()
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    scheme = QuantizationScheme(targets=["Linear"], weights=NVFP4["weights"])
    W = torch.randn(37, 80, generator=torch.Generator().manual_seed(0)) * 0.05
    W[2, 16:32] = 0
    W[3, 5] = -0.0
    g = generate_gparam(W.amin(), W.amax())
    G = W.reshape(37, -1, 16)
    s, _ = calculate_qparams(G.amin(-1), G.amax(-1), scheme.weights, global_scale=g)
    ct = NVFP4PackedCompressor.compress({"weight": W, "weight_scale": s, "weight_global_scale": g}, scheme)
    packed, sc, gs = quantized(W)
    assert torch.equal(gs, ct["weight_global_scale"]) and torch.equal(sc.view(torch.uint8),
                                                                       ct["weight_scale"].view(torch.uint8))
    assert torch.equal(packed, ct["weight_packed"])
    dec = NVFP4PackedCompressor.decompress(ct, scheme)["weight"]  # bf16, as from_pretrained gets it
    assert torch.equal(nvfp4.dequantize(packed, sc, gs).to(torch.bfloat16), dec)
    assert torch.equal(nvfp4.dequantize(packed, sc, gs).double(), o_dequant(packed, sc, gs))


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("M,N,r,big", [(37, 48, 5, 2), (1, 32, 1, 0), (64, 256, 16, 1)])
def test_merge_equals_fp64_oracle(fresh, stochastic, M, N, r, big):
    packed, sc, g, Bs, A = random_weight(M, N, r, seed=M + N, big_rows=big)
    before = (packed.clone(), sc.clone(), g.clone())
    res = nvfp4.merge_(packed, sc, g, Bs, A, 1.0, policy="fresh" if fresh else "reuse",
                       rounding="stochastic" if stochastic else "nearest", seed=7)
    assert torch.equal(packed, before[0]) and torch.equal(sc.view(torch.uint8), before[1].view(torch.uint8))
    assert torch.equal(g, before[2])
    want_p, want_s, want_g, sums, clipped = oracle(packed, sc, g, Bs, A, fresh, stochastic, stream_key(7))
    assert torch.equal(res.blocks, want_p)
    assert torch.equal(res.scales.view(torch.uint8), want_s.view(torch.uint8))
    assert torch.equal(res.global_scale, want_g)
    assert res.rescaled_count == int(clipped.sum()) and (big == 0 or fresh or res.rescaled_count > 0)
    for got, want in ((res.kept, sums[0]), (res.other, sums[1])):
        assert [got.dot, got.delta2, got.noise2] == pytest.approx(want, rel=1e-9, abs=1e-30)


def test_reuse_nearest_is_compressed_tensors_quantizer_on_the_kept_scales():
    _ct()
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    packed, sc, g, Bs, A = random_weight(64, 96, 8, seed=2)
    res = nvfp4.merge_(packed, sc, g, Bs, A, 1.0)
    W1 = (nvfp4.dequantize(packed, sc, g).double() + Bs.double() @ A.double()).float()
    assert res.rescaled_count == 1  # (the group of zeros)
    assert torch.equal(res.blocks, quantize_and_pack_fp4(W1, res.scales.float(), g, group_size=16))


def test_nearest_erases_a_small_update_and_stochastic_keeps_it_over_seeds():
    packed, sc, g, Bs, A = random_weight(128, 64, 8, seed=3)
    near = nvfp4.merge_(packed, sc, g, Bs, A, 1.0)
    assert near.kept.retained < 0.5
    W = nvfp4.dequantize(packed, sc, g).double()
    kept = []
    for seed in range(64):
        res = nvfp4.merge_(packed, sc, g, Bs, A, 1.0, rounding="stochastic", seed=seed)
        W1 = (W + Bs.double() @ A.double()).float().double()
        moved, delta = nvfp4.dequantize(res.blocks, res.scales, res.global_scale).double() - W, W1 - W
        assert res.kept.retained == pytest.approx(float((moved * delta).sum() / (delta * delta).sum()), rel=1e-6)
        kept.append(res.kept.retained)
    assert sum(kept) / len(kept) >= 0.95


def test_refusals_name_the_group():
    packed, sc, g, Bs, A = random_weight(8, 32, 2, seed=5, big_rows=1)
    with pytest.raises(Exception, match=r"q_proj\.weight_packed: \d+ group\(s\) do not fit .* row 0"):
        nvfp4.merge_(packed, sc, g, Bs, A, 1.0, on_clip="refuse", name="q_proj")
    # an update 3x the weight's largest value outgrows the global scale: the weight is requantized fresh
    grown = nvfp4.merge_(packed, sc, g, Bs * 10, A, 1.0, name="q_proj")
    fresh = nvfp4.merge_(packed, sc, g, Bs * 10, A, 1.0, name="q_proj", policy="fresh")
    assert grown.refreshed and not fresh.refreshed and float(fresh.global_scale) < float(g)
    assert torch.equal(grown.blocks, fresh.blocks) and torch.equal(grown.scales.view(torch.uint8),
                                                                   fresh.scales.view(torch.uint8))
    assert torch.equal(grown.global_scale, fresh.global_scale)
    with pytest.raises(Exception, match=r"q_proj\.weight_packed: \d+ group\(s\) do not fit"):
        nvfp4.merge_(packed, sc, g, Bs * 10, A, 1.0, name="q_proj", on_clip="refuse")
    from portllm.merge import NonFiniteMergeError

    with pytest.raises(NonFiniteMergeError, match=r"q_proj\.weight_packed"):
        nvfp4.merge_(packed, sc, g, Bs * 1e30, A * 1e30, 1.0, name="q_proj")


# -- the port ---------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
K = "model.layers.1.mlp.down_proj"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _digest(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        with open(os.path.join(d, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _nvfp4_config():
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": None, "input_activations": None,
                                          "output_activations": None,
                                          "weights": {"num_bits": 4, "type": "float", "symmetric": True,
                                                      "group_size": 16, "strategy": "tensor_group", "dynamic": False,
                                                      "scale_dtype": "torch.float8_e4m3fn"}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None}


@pytest.fixture(scope="module")
def nv_checkpoint(tmp_path_factory):
    """A tiny Llama in NVFP4 as llm-compressor writes it (every Linear but lm_head), and a PEFT adapter on
    q_proj and down_proj whose update is about 1% of the weights."""
    _ct()
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("nvfp4")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(tuple(p + ".weight" for p in PROJ)):
            p = k.removesuffix("weight")
            if k == K + ".weight":  # a group of zeros (scale 0.125): the update does not fit it
                v = v.clone()
                v[0, :16] = 0
            sd[p + "weight_packed"], sd[p + "weight_scale"], sd[p + "weight_global_scale"] = quantized(v.float())
        else:
            sd[k] = v.to(torch.bfloat16)
    ckpt = root / "model"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["dtype"] = "bfloat16"
    c["quantization_config"] = _nvfp4_config()
    (ckpt / "config.json").write_text(json.dumps(c, indent=2))
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.011
    pm.save_pretrained(str(root / "adapter"))
    return str(ckpt), str(root / "adapter"), sd


def load(d):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            d, quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
            dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("rounding,policy", [("nearest", "reuse"), ("stochastic", "reuse"), ("nearest", "fresh")])
def test_port_loads_in_transformers_with_the_oracles_logits(nv_checkpoint, tmp_path, rounding, policy):
    import zlib

    from safetensors.torch import load_file

    from portllm.patch import Patch

    ckpt, adapter, sd = nv_checkpoint
    before = (_digest(ckpt), _digest(adapter))
    out = str(tmp_path / "out")
    res = portllm.port(ckpt, adapter, out, rounding=rounding, seed=3, fp4_scales=policy, allow_low_retention=True,
                       progress=False, log=None)
    assert res.merged == 4 and (_digest(ckpt), _digest(adapter)) == before
    written = load_file(os.path.join(out, "model.safetensors"))
    assert written.keys() == sd.keys()
    got, want = load(out), load(ckpt)
    patch = Patch.load(adapter)
    params = dict(want.named_parameters())
    for name, m in patch.items():
        p = name + "."
        key = stream_key(zlib.crc32(f"{3}|{name}.weight_packed".encode()))
        q, s, g, _, _ = oracle(sd[p + "weight_packed"], sd[p + "weight_scale"], sd[p + "weight_global_scale"],
                               m.B.float() * m.scale, m.A.float(), policy == "fresh", rounding == "stochastic", key)
        assert torch.equal(written[p + "weight_packed"], q), name
        assert torch.equal(written[p + "weight_scale"].view(torch.uint8), s.view(torch.uint8)), name
        with torch.no_grad():
            params[p + "weight"].copy_(o_dequant(q, s, g).to(torch.bfloat16))
    for k in sd:  # every other tensor byte for byte
        if not k.startswith(tuple(n + "." for n in patch.modules)):
            assert torch.equal(written[k].view(torch.uint8), sd[k].view(torch.uint8)), k
    gs, ws = got.state_dict(), want.state_dict()
    for k in ws:
        assert torch.equal(gs[k], ws[k]), k
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    rep = json.load(open(os.path.join(out, "portllm_port.json")))["nvfp4"]
    assert rep["rounding"] == rounding and rep["scales"] == policy and set(rep["parameters"]) == set(patch.modules)
    if rounding == "stochastic":
        assert rep["retained"] > 0.8 and rep["nearest"]["retained"] < 0.5


def test_low_retention_refused_with_what_stochastic_keeps(nv_checkpoint, tmp_path):
    from portllm.port_mxfp4 import LowRetentionError

    ckpt, adapter, _ = nv_checkpoint
    with pytest.raises(LowRetentionError, match=r"NVFP4 \(nearest rounding, scales reuse\): only \d+\.\d% .* "
                                                r"stochastic rounding would keep \d+\.\d%.*nothing written"):
        portllm.port(ckpt, adapter, str(tmp_path / "out"), progress=False, log=None)
    assert not (tmp_path / "out").exists()


def test_cli_port_stochastic(nv_checkpoint, tmp_path, capsys):
    from portllm.cli import main

    ckpt, adapter, _ = nv_checkpoint
    assert main(["port", "--model", ckpt, "--patch", adapter, "--out", str(tmp_path / "o"), "--rounding",
                 "stochastic"]) == 0
    assert "NVFP4 (stochastic rounding, scales reuse)" in capsys.readouterr().out


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])
    return edit


def _group(c, **kw):
    c["quantization_config"]["config_groups"]["group_0"]["weights"].update(kw)


@pytest.mark.parametrize("edit,config,msg,kw", [
    (_set(K + ".weight_scale", lambda t: t[:, :1].contiguous()), None,
     rf"tensor {K}\.weight_scale: expected float8_e4m3fn \(64, 6\)", {}),
    (_set(K + ".weight_scale", lambda t: torch.where(torch.arange(6) == 2, float("nan"), t.float()).to(E4M3)), None,
     rf"tensor {K}\.weight_scale: 64 of 384 group scales are not finite", {}),
    (_set(K + ".weight_global_scale", lambda t: -t), None, rf"tensor {K}\.weight_global_scale: -\S+ is not finite", {}),
    (_set(K + ".weight_packed", lambda t: t.to(torch.int16)), None, rf"tensor {K}\.weight_packed: expected uint8", {}),
    (lambda sd: sd.pop(K + ".weight_global_scale"), None, rf"{K}\.weight_packed: the checkpoint has no "
                                                          rf"{K}\.weight_global_scale", {}),
    (None, lambda c: _group(c, group_size=32), r"config_groups\.group_0\.weights: \{'group_size': 32\} is not NVFP4", {}),
    (None, lambda c: c["quantization_config"].update(format="pack-quantized"), r"format is 'pack-quantized'", {}),
    (None, None, r"backend 'cpp': the NVFP4 merge runs on the reference backend only", {"backend": "cpp"}),
    (None, None, r"written NVFP4; portllm does not write it dequantized", {"dtype": "bfloat16"}),
    (None, None, r"down_proj\.weight_packed: \d+ group\(s\) do not fit", {"fp4_clip": "refuse"}),
])
def test_bad_inputs_named_and_nothing_written(nv_checkpoint, tmp_path, edit, config, msg, kw):
    from safetensors.torch import load_file, save_file

    ckpt, adapter, _ = nv_checkpoint
    if edit or config:
        bad = tmp_path / "bad"
        shutil.copytree(ckpt, bad)
        if edit:
            sd = load_file(str(bad / "model.safetensors"))
            edit(sd)
            save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
        if config:
            c = json.loads((bad / "config.json").read_text())
            config(c)
            (bad / "config.json").write_text(json.dumps(c))
        ckpt = str(bad)
    before = (_digest(ckpt), _digest(adapter))
    with pytest.raises((ValueError, RuntimeError), match=msg) as err:
        portllm.port(ckpt, adapter, str(tmp_path / "out"), progress=False, log=None, allow_low_retention=True, **kw)
    assert "\n" not in str(err.value)
    assert (_digest(ckpt), _digest(adapter)) == before and not (tmp_path / "out").exists()


def test_a_weight_that_outgrows_its_global_scale_is_requantized_fresh_and_named(nv_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    ckpt, adapter, sd = nv_checkpoint
    big = tmp_path / "big"
    shutil.copytree(adapter, big)
    f = big / "adapter_model.safetensors"
    save_file({k: v * 100 if "lora_B" in k else v for k, v in load_file(str(f)).items()}, str(f))
    portllm.port(ckpt, str(big), str(tmp_path / "o"), progress=False, allow_low_retention=True)
    rep = json.load(open(tmp_path / "o" / "portllm_port.json"))["nvfp4"]
    assert rep["refreshed"] and set(rep["refreshed"]) <= set(rep["parameters"])
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    k = rep["refreshed"][0]
    assert not torch.equal(out[k + ".weight_global_scale"], sd[k + ".weight_global_scale"])
    assert "outgrew their global scale after the merge" in capsys.readouterr().out
