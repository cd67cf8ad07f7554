"""MXFP8 (compressed-tensors' mxfp8-quantized, llm-compressor's MXFP8 releases): the quantizer and
dequantizer against compressed-tensors' own, the merge against an fp64 oracle written here from the
definition (``portllm.mxfp8``'s docstring), and the port end to end: loaded by ``from_pretrained``
(compressed-tensors decompressing on the CPU), its weights and logits the oracle's."""

import hashlib
import json
import math
import os
import shutil

import pytest
import torch

import portllm
from portllm import fp8, mxfp8

E4M3 = torch.float8_e4m3fn


# -- the oracle --------------------------------------------------------------------------------------
def o_dequant(q, scale):
    M = q.shape[0]
    return (q.double().reshape(M, -1, 32) * torch.pow(2.0, scale.double() - 127)[..., None]).reshape(M, -1)


def o_scales(W32):
    """p = the group's amax rounded to a power of two, up from 1.75·2^k; byte = log2(p) + 127 − 8."""
    amax = W32.reshape(W32.shape[0], -1, 32).abs().amax(-1).double()
    out = torch.zeros(amax.shape, dtype=torch.int64)
    for i, a in enumerate(amax.reshape(-1).tolist()):
        if a > 0:
            m, e = math.frexp(a)  # a = m·2^e, m in [0.5, 1): 2m ≥ 1.75 rounds up
            out.view(-1)[i] = min(255, max(0, (e - 1) + (2 * m >= 1.75) + 127 - 8))
    return out.to(torch.uint8)


def oracle(q, scale, Bs, A, rounding, key):
    M, N = q.shape
    W = o_dequant(q, scale)
    acc = W.clone()
    for k in range(Bs.shape[1]):
        acc = acc + Bs[:, k:k + 1].double() * A[k:k + 1].double()
    W1 = acc.float()
    sc = o_scales(W1)
    x = (W1.double().reshape(M, -1, 32) / torch.pow(2.0, sc.double() - 127)[..., None]).reshape(M, N)
    x = torch.where(x == 0, 0.0, x).clamp(-448, 448).float()  # (−0 to +0: the symmetric zero point)
    if rounding == "nearest":
        q2 = x.to(E4M3)
    else:  # e4m3's grid around |x|, chosen up with the probability of the 20 random bits
        q2 = fp8.round_e4m3(x, "stochastic", key=key, index=torch.arange(M * N).reshape(M, N))
    moved, delta = o_dequant(q2, sc) - W, W1.double() - W
    return q2, sc, [float((moved * delta).sum()), float((delta * delta).sum()), float(((moved - delta) ** 2).sum())]


def quantized(W):
    sc = mxfp8.fresh_scales(W)
    return mxfp8.quantize(W, sc), sc


def random_weight(M, N, r, seed, rel=0.01):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g) * 0.05
    W[M // 2, :32] = 0
    q, sc = quantized(W)
    B, A = torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)
    return q, sc, B * (rel * 0.05 / float((B @ A).pow(2).mean().sqrt())), A


def _ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make installs it "
                               "from requirements-lock.txt): the checks against its quantizer and loader need it")


# -- the merge ---------------------------------------------------------------------------------------
def test_quantizer_and_dequantizer_are_compressed_tensors():
    _ct()
    from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP8
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = QuantizationScheme(targets=["Linear"], weights=MXFP8["weights"])
    W = torch.randn(37, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    W[2, 32:64] = 0
    W[3, 5] = -0.0
    W[4, :32] *= 1.75 / float(W[4, :32].abs().max() / 2 ** -5)  # a group whose amax is 1.75·2^-5 exactly
    s, zp = calculate_qparams(W.reshape(37, -1, 32).amin(-1), W.reshape(37, -1, 32).amax(-1), scheme.weights)
    ct = MXFP8QuantizationCompressor.compress({"weight": W, "weight_scale": s, "weight_zero_point": zp}, scheme)
    q, sc = quantized(W)
    assert torch.equal(sc, ct["weight_scale"]) and torch.equal(sc, o_scales(W))
    assert torch.equal(q.view(torch.uint8), ct["weight"].view(torch.uint8))
    dec = MXFP8QuantizationCompressor.decompress(ct, scheme)["weight"]
    assert torch.equal(mxfp8.dequantize(q, sc).to(dec.dtype), dec)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("M,N,r", [(37, 96, 5), (1, 32, 1), (64, 256, 16)])
def test_merge_equals_fp64_oracle(rounding, M, N, r):
    q, sc, Bs, A = random_weight(M, N, r, seed=M + N)
    before = (q.clone(), sc.clone())
    q2, s2, st = mxfp8.merge_(q, sc, Bs, A, torch.ones(r), rounding=rounding, seed=7)
    assert torch.equal(q.view(torch.uint8), before[0].view(torch.uint8)) and torch.equal(sc, before[1])
    wq, ws, sums = oracle(q, sc, Bs, A, rounding, fp8.stream_key(7))
    assert torch.equal(s2, ws) and torch.equal(q2.view(torch.uint8), wq.view(torch.uint8))
    assert [st.dot, st.delta2, st.noise2] == pytest.approx(sums, rel=1e-9, abs=1e-30)


def test_stochastic_keeps_the_update_over_seeds():
    q, sc, Bs, A = random_weight(128, 64, 8, seed=3)
    near = mxfp8.merge_(q, sc, Bs, A, torch.ones(8))[2]
    kept = [mxfp8.merge_(q, sc, Bs, A, torch.ones(8), rounding="stochastic", seed=s)[2].retained for s in range(64)]
    assert near.retained < 0.6 and sum(kept) / len(kept) >= 0.95


def test_refusals_name_the_tensor():
    from portllm.merge import NonFiniteMergeError

    q, sc, Bs, A = random_weight(8, 64, 2, seed=5)
    with pytest.raises(NonFiniteMergeError, match=r"tensor up_proj: the merged weight has NaN or Inf"):
        mxfp8.merge_(q, sc, Bs * 1e30, A * 1e30, torch.ones(2), name="up_proj")


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


def _mxfp8_config():
    return {"quant_method": "compressed-tensors", "format": "mxfp8-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": None, "input_activations": None,
                                          "output_activations": None,
                                          "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                      "group_size": 32, "strategy": "group", "dynamic": False,
                                                      "scale_dtype": "torch.uint8"}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None}


@pytest.fixture(scope="module")
def mx8_checkpoint(tmp_path_factory):
    """A tiny Llama in MXFP8 as llm-compressor writes it (every Linear but lm_head), and a PEFT adapter on
    q_proj and down_proj whose update is about 1% of the weights."""
    _ct()
    peft = pytest.importorskip("peft")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("mxfp8")
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
            sd[k], sd[k + "_scale"] = quantized(v.float())
        else:
            sd[k] = v.to(torch.bfloat16)
    ckpt = root / "model"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["dtype"] = "bfloat16"
    c["quantization_config"] = _mxfp8_config()
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


def load(d, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            d, quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
            dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_port_loads_in_transformers_with_the_oracles_logits(mx8_checkpoint, tmp_path, rounding):
    import zlib

    from safetensors.torch import load_file

    from portllm.patch import Patch

    ckpt, adapter, sd = mx8_checkpoint
    before = (_digest(ckpt), _digest(adapter))
    out = str(tmp_path / "out")
    res = portllm.port(ckpt, adapter, out, rounding=rounding, seed=3, progress=False, log=None)
    assert res.merged == 4 and (_digest(ckpt), _digest(adapter)) == before
    written = load_file(os.path.join(out, "model.safetensors"))
    assert written.keys() == sd.keys()
    got, want = load(out), load(ckpt)
    patch = Patch.load(adapter)
    params = dict(want.named_parameters())
    for name, m in patch.items():
        k = name + ".weight"
        key = fp8.stream_key(zlib.crc32(f"{3}|{k}".encode()))
        q, s, _ = oracle(sd[k], sd[k + "_scale"], m.B.float() * m.scale, m.A.float(), rounding, key)
        assert torch.equal(written[k].view(torch.uint8), q.view(torch.uint8)) and torch.equal(written[k + "_scale"], s)
        with torch.no_grad():
            params[k].copy_(o_dequant(q, s).to(torch.bfloat16))
    for k in sd:
        if not k.startswith(tuple(n + "." for n in patch.modules)):
            assert torch.equal(written[k].view(torch.uint8), sd[k].view(torch.uint8)), k
    gs, ws = got.state_dict(), want.state_dict()
    for k in ws:
        assert torch.equal(gs[k], ws[k]), k
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    rep = json.load(open(os.path.join(out, "portllm_port.json")))["fp8"]
    assert rep["rounding"] == rounding and set(rep["modules"]) == set(patch.modules)


def test_port_dtype_writes_it_dequantized(mx8_checkpoint, tmp_path):
    from safetensors.torch import load_file

    ckpt, adapter, sd = mx8_checkpoint
    portllm.port(ckpt, adapter, str(tmp_path / "o"), dtype="bfloat16", progress=False, log=None)
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert set(out) == {k for k in sd if not k.endswith("_scale")}
    k = "model.layers.0.mlp.up_proj.weight"  # not in the patch: dequantized as compressed-tensors does
    assert torch.equal(out[k], o_dequant(sd[k], sd[k + "_scale"]).to(torch.bfloat16))
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())


def _set(key, fn):
    def edit(sd):
        sd[key] = fn(sd[key])
    return edit


@pytest.mark.parametrize("edit,config,msg", [
    (_set(K + ".weight_scale", lambda t: t[:, :1].contiguous()), None, rf"tensor {K}\.weight_scale: expected uint8 "
                                                                        r"\(64, 3\)"),
    (_set(K + ".weight_scale", lambda t: torch.where(torch.arange(3) == 1, 255, t.long()).to(torch.uint8)), None,
     rf"tensor {K}\.weight_scale: 64 of 192 group scales are NaN"),
    (_set(K + ".weight_scale", lambda t: torch.where(torch.arange(3) == 1, 247, t.long()).to(torch.uint8)), None,
     rf"tensor {K}\.weight_scale: 64 of 192 group scales are above 2\^119"),
    (None, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(group_size=16),
     r"config_groups\.group_0\.weights: \{'group_size': 16\} is not MXFP8"),
])
def test_bad_inputs_named_and_nothing_written(mx8_checkpoint, tmp_path, edit, config, msg):
    from safetensors.torch import load_file, save_file

    ckpt, adapter, _ = mx8_checkpoint
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
    before = (_digest(bad), _digest(adapter))
    with pytest.raises((ValueError, RuntimeError), match=msg) as err:
        portllm.port(str(bad), adapter, str(tmp_path / "out"), progress=False, log=None)
    assert "\n" not in str(err.value)
    assert (_digest(bad), _digest(adapter)) == before and not (tmp_path / "out").exists()
