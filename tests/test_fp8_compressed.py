"""compressed-tensors FP8 (portllm.fp8_compressed; llm-compressor's FP8, FP8_DYNAMIC, FP8_BLOCK): the merge
against a float64 reference written here from the math and, where the package is installed, against
compressed-tensors' own quantizer and dequantizer bit for bit; stochastic rounding unbiased; the port
writes the input's format (or a dequantized checkpoint with --dtype) and transformers loads it."""

import json

import pytest
import torch

import portllm
from portllm import fp8
from portllm import fp8_compressed as fc

E4M3 = torch.float8_e4m3fn
STRATEGIES = [("channel", None), ("tensor", None), ("block", (128, 128))]
SCALE_SHAPE = {"tensor": lambda M, N: (1,), "channel": lambda M, N: (M, 1),
               "block": lambda M, N: (-(-M // 128), -(-N // 128))}


def _ct():
    return pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (make installs it "
                               "where PyPI is reachable): the checks against its quantizer and loader need it")


def _quantize_here(W, strategy, sd):
    """compressed-tensors' quantizer from its math (module docstring of portllm.fp8_compressed), written
    independently: amax per group in sd, scale = amax / 448 in sd (zero -> eps), q = clamp(W / scale) in sd."""
    Ws = W.to(sd)
    M, N = W.shape
    if strategy == "tensor":
        amax = Ws.abs().amax().reshape(1, 1)
        S = lambda s: s.expand(M, N)  # noqa: E731
    elif strategy == "channel":
        amax = Ws.abs().amax(dim=1, keepdim=True)
        S = lambda s: s.expand(M, N)  # noqa: E731
    else:
        amax = torch.stack([torch.stack([Ws[i:i + 128, j:j + 128].abs().amax() for j in range(0, N, 128)])
                            for i in range(0, M, 128)])
        S = lambda s: s.repeat_interleave(128, 0)[:M].repeat_interleave(128, 1)[:, :N]  # noqa: E731
    scale = (amax.float() / 448).to(sd)
    scale = torch.where(scale == 0, torch.finfo(sd).eps, scale.float()).to(sd)
    q = (Ws / S(scale)).clamp(-448, 448).to(E4M3)
    return q, scale.reshape(SCALE_SHAPE[strategy](M, N)), S


def _weight(M, N, strategy, sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g) * 0.05
    W[3] = 0  # a zero row: the eps scale where a channel is all zeros
    q, scale, S = _quantize_here(W, strategy, sd)
    return q, scale, S


def _factors(M, N, r, seed=1, rel=0.01):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(M, r, generator=g) * 0.05, torch.randn(r, N, generator=g) * 0.05
    return B, A, torch.full((r,), rel * 0.05 / float((B @ A).pow(2).mean().sqrt()))


def _merged(q, scale, S, B, A, sc):
    W = q.to(scale.dtype) * S(scale.reshape(-1, scale.shape[-1]) if scale.dim() == 2 else scale.reshape(1, 1))
    return W, (W.double() + (B.float() * sc).double() @ A.double()).float()


@pytest.mark.parametrize("sd", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strategy,block", STRATEGIES)
@pytest.mark.parametrize("shape", [(300, 200), (5, 7), (129, 260)])
def test_nearest_is_the_quantizer_of_the_merged_weight(shape, strategy, block, sd):
    M, N = shape
    q, scale, S = _weight(M, N, strategy, sd)
    B, A, sc = _factors(M, N, 8)
    q0, s0 = q.clone(), scale.clone()
    out_q, out_s, st = fc.merge_(q, scale, B, A, sc, fc.block_of(strategy, shape, block), band=64)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(scale, s0)  # inputs untouched
    _, W1 = _merged(q, scale, S, B, A, sc)
    ref_q, ref_s, _ = _quantize_here(W1, strategy, sd)
    assert out_s.dtype == sd and out_s.shape == scale.shape and torch.equal(out_s, ref_s)
    assert torch.equal(out_q.view(torch.uint8), ref_q.view(torch.uint8))
    assert 0 < st.retained < 1


@pytest.mark.parametrize("sd", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strategy,block", STRATEGIES)
def test_bit_for_bit_compressed_tensors(strategy, block, sd):
    """Its dequantization is compressed-tensors', and the merged (q, scale) are its quantizer's output
    (calculate_qparams, quantize) for the merged weight in the scale's dtype."""
    _ct()
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    M, N = 300, 200
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False,
                            block_structure=list(block) if block else None)
    q, scale, S = _weight(M, N, strategy, sd, seed=2)
    blk = fc.block_of(strategy, (M, N), block)
    assert torch.equal(fc.dequantize(q, scale, blk), dequantize(q, scale, None, args))
    B, A, sc = _factors(M, N, 16, seed=3)
    out_q, out_s, _ = fc.merge_(q, scale, B, A, sc, blk)
    _, W1 = _merged(q, scale, S, B, A, sc)
    amax = fc._amax(W1.to(sd), blk)
    theirs_s, _ = calculate_qparams(-amax, amax, args)
    theirs_s = theirs_s.reshape(scale.shape)
    zp = torch.zeros_like(theirs_s)  # llm-compressor compresses with the symmetric zero point of zeros
    theirs_q = quantize(W1.to(sd), theirs_s, zp, args, dtype=E4M3)
    assert torch.equal(out_s, theirs_s)
    assert torch.equal(out_q.view(torch.uint8), theirs_q.view(torch.uint8))
    W1[0, :3] = torch.tensor([-0.0, 0.0, -1e-30])  # signed zeros and a tiny negative: +0 codes, as theirs
    theirs_q = quantize(W1.to(sd), theirs_s, zp, args, dtype=E4M3)
    grid = fc.scale_grid(theirs_s, (M, N), blk)
    mine_q, _ = fc.quantize(W1, blk, sd, scale=grid)
    assert torch.equal(mine_q.view(torch.uint8), theirs_q.view(torch.uint8))


@pytest.mark.parametrize("strategy,block", STRATEGIES)
def test_stochastic_is_unbiased_seeded_and_retention_direct(strategy, block):
    M, N = 128, 256
    q, scale, S = _weight(M, N, strategy, torch.bfloat16, seed=4)
    B, A, sc = _factors(M, N, 8, seed=5)
    blk = fc.block_of(strategy, (M, N), block)
    W, W1 = _merged(q, scale, S, B, A, sc)
    target = W1.double()
    acc = torch.zeros_like(target)
    for seed in range(64):
        qq, ss, _ = fc.merge_(q, scale, B, A, sc, blk, rounding="stochastic", seed=seed)
        acc += fc.dequantize(qq, ss, blk).double()
    rel = float((acc / 64 - target).norm() / target.norm())
    assert rel <= 0.02, rel
    a = fc.merge_(q, scale, B, A, sc, blk, rounding="stochastic", seed=7)
    b = fc.merge_(q, scale, B, A, sc, blk, rounding="stochastic", seed=7, band=16)  # bands do not change it
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
    for rounding in fp8.ROUNDINGS:
        out_q, out_s, st = fc.merge_(q, scale, B, A, sc, blk, rounding=rounding, seed=1)
        delta = W1.double() - W.double()
        moved = fc.dequantize(out_q, out_s, blk).double() - W.double()
        assert st.retained == pytest.approx(float((moved * delta).sum() / (delta * delta).sum()), rel=1e-6)
        assert st.noise == pytest.approx(float((moved - delta).norm() / delta.norm()), rel=1e-6)
    assert a[2].retained > fc.merge_(q, scale, B, A, sc, blk)[2].retained


def test_fp16_overflow_is_refused_by_name():
    q, scale, S = _weight(8, 8, "channel", torch.float16)
    B, A = torch.full((8, 1), 300.0), torch.full((1, 8), 300.0)
    with pytest.raises(ValueError, match=r"tensor x\.weight: the merged weight is not finite in float16"):
        fc.merge_(q, scale, B, A, torch.ones(1), (1, 8), name="x.weight")


def test_bad_scales_are_named():
    q, scale, _ = _weight(16, 8, "channel", torch.bfloat16)
    with pytest.raises(fp8.FP8FormatError, match=r"l\.weight_scale: shape \(16,\) does not match .* \(16, 1\)"):
        fc.check_scales(q.shape, q.dtype, scale.reshape(16), "channel", None, "l.weight")
    bad = scale.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(fp8.FP8FormatError, match=r"l\.weight_scale: 1 of 16 scales are not finite and positive"):
        fc.check_scales(q.shape, q.dtype, bad, "channel", None, "l.weight")
    with pytest.raises(fp8.FP8FormatError, match=r"l\.weight_scale: dtype torch\.float8_e4m3fn"):
        fc.check_scales(q.shape, q.dtype, scale.to(E4M3), "channel", None, "l.weight")


# --- the port -------------------------------------------------------------------------------------------

def _config_groups(strategy, block, static_input):
    w = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
         "group_size": None, "block_structure": list(block) if block else None}
    act = ({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
           if static_input else {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                 "dynamic": True})
    return {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": act, "output_activations": None,
                        "format": "float-quantized"}}


def _ct_checkpoint(path, strategy="channel", block=None, static_input=False, seed=0):
    """A tiny Llama in compressed-tensors FP8 as llm-compressor writes it: every Linear but lm_head with
    ``weight`` float8_e4m3fn and ``weight_scale`` bf16 (and a static ``input_scale`` with the FP8 preset)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            sd[k], sd[k + "_scale"], _ = _quantize_here(v.float(), strategy, torch.bfloat16)
            if static_input:
                sd[k.removesuffix("weight") + "input_scale"] = torch.tensor([0.0123], dtype=torch.bfloat16)
        else:
            sd[k] = v.to(torch.bfloat16)
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["dtype"] = "bfloat16"
    c["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                "quantization_status": "compressed", "config_groups":
                                _config_groups(strategy, block, static_input), "ignore": ["lm_head"],
                                "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
                                "global_compression_ratio": None, "version": "0.20.1"}
    (path / "config.json").write_text(json.dumps(c))
    return sd


def _patch(seed=1):
    from portllm.patch import Patch, PatchModule

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(2):
        for name, (o, n) in {"self_attn.q_proj": (128, 128), "mlp.down_proj": (128, 192)}.items():
            mods[f"model.layers.{i}.{name}"] = PatchModule(torch.randn(o, 8, generator=g) * 0.05,
                                                           torch.randn(8, n, generator=g) * 0.05, 0.5)
    return Patch(mods)


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("strategy,block,static_input,rounding",
                         [("channel", None, False, "nearest"), ("tensor", None, True, "stochastic"),
                          ("block", (128, 128), False, "nearest")])
def test_port_onto_compressed_tensors_fp8(tmp_path, strategy, block, static_input, rounding):
    """The port writes the input's format: each patched weight and scale as fc.merge_ computes them, every
    other tensor (activation scales included) byte for byte; the quantization_config kept; the report
    states the retention. Loaded by transformers (compressed-tensors decompressing), its weights and
    logits are those of the merge computed here."""
    from safetensors.torch import load_file

    sd = _ct_checkpoint(tmp_path / "m", strategy, block, static_input)
    patch = _patch()
    before = _files(tmp_path / "m")
    lines = []
    portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), rounding=rounding, seed=3, progress=False,
                 log=lines.append)
    assert _files(tmp_path / "m") == before
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert out.keys() == sd.keys()
    import zlib

    ref = dict(sd)
    for k, v in sd.items():
        name = k.removesuffix(".weight").removesuffix(".weight_scale")
        if name in patch.modules and k.endswith(("weight", "weight_scale")):
            if k.endswith("weight"):
                m = patch[name]
                blk = fc.block_of(strategy, tuple(v.shape), block)
                q, s, _ = fc.merge_(v, sd[k + "_scale"], m.B, m.A, torch.full((8,), 0.5), blk, rounding=rounding,
                                    seed=zlib.crc32(f"3|{k}".encode()))
                assert torch.equal(out[k].view(torch.uint8), q.view(torch.uint8)), k
                assert torch.equal(out[k + "_scale"], s), k
                ref[k], ref[k + "_scale"] = q, s
                assert not torch.equal(out[k].view(torch.uint8), v.view(torch.uint8))
        else:
            assert out[k].dtype == v.dtype and torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    info = json.loads((tmp_path / "o" / "portllm_port.json").read_text())
    assert info["fp8"]["rounding"] == rounding and 0 < info["fp8"]["retained"] <= 1.5
    assert any(f"FP8 ({rounding} rounding, compressed-tensors FP8" in x and "survived requantization" in x
               for x in lines)
    _ct()
    import shutil

    from safetensors.torch import save_file

    # The reference merge's checkpoint: the same files, the merged tensors computed here.
    shutil.copytree(tmp_path / "m", tmp_path / "ref")
    save_file(ref, str(tmp_path / "ref" / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for d in ("o", "ref"):
        model = _load_ct(tmp_path / d)
        for k, v in out.items():  # the weights compressed-tensors decompresses: the port's, dequantized
            if not k.endswith("_scale") and not k.endswith("input_scale"):
                w = fc.dequantize(v, out[k + "_scale"], fc.block_of(strategy, tuple(v.shape), block)) \
                    if k + "_scale" in out else v
                assert d == "ref" or torch.equal(model.state_dict()[k], w), k
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert bool(torch.isfinite(logits[0]).all()) and torch.equal(logits[0], logits[1])


def _load_ct(path):
    """transformers' from_pretrained, compressed-tensors decompressing the weights to bf16 on the CPU."""
    import warnings

    import transformers
    from transformers import CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=CompressedTensorsConfig(run_compressed=False))


def test_port_dtype_bfloat16_from_compressed_tensors(tmp_path):
    """--dtype bfloat16: the weights dequantized as compressed-tensors does, merged in fp32 and rounded once;
    weight and input scales and the quantization_config dropped; a plain model transformers loads."""
    from safetensors.torch import load_file

    sd = _ct_checkpoint(tmp_path / "m", "tensor", None, static_input=True)
    patch = _patch()
    portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), dtype="bfloat16", progress=False, log=None)
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert set(out) == {k for k in sd if not k.endswith(("_scale", "input_scale"))}
    for k, v in out.items():
        assert v.dtype == torch.bfloat16, k
        if k + "_scale" in sd:
            W = fc.dequantize(sd[k], sd[k + "_scale"], fc.block_of("tensor", tuple(v.shape))).float()
            name = k.removesuffix(".weight")
            if name in patch.modules:
                m = patch[name]
                W = W + m.scale * (m.B.float() @ m.A.float())
                err = (v.double() - W.double()).abs()
                assert bool((err <= W.abs().double() * 2.0 ** -8 + 1e-12).all()), k
            else:
                assert torch.equal(v, W.to(torch.bfloat16)), k
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "quantization_config" not in cfg
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    k = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[k], out[k])


@pytest.mark.parametrize("change,match", [
    (lambda qc: qc.update(quantization_status="frozen"), r"quantization_config\.quantization_status is 'frozen'"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=128),
     r"config_groups\.group_0\.weights: scale_dtype / group_size"),
    (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4),
     r"config_groups\.group_0\.weights: .* is not 8-bit float"),
    (lambda qc: qc.update(transform_config={"config_groups": {"u": {}}}), r"quantization_config\.transform_config"),
    (lambda qc: qc.update(format="pack-quantized"), r"quantization_config\.format is 'pack-quantized'"),
])
def test_unsupported_configs_are_refused_by_field(tmp_path, change, match):
    _ct_checkpoint(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    change(cfg["quantization_config"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    before = _files(tmp_path / "m")
    with pytest.raises(portllm.IncompatiblePatchError, match=match):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), progress=False, log=None)
    assert _files(tmp_path / "m") == before and not (tmp_path / "o").exists()


def test_bad_scale_tensors_and_backend_are_refused(tmp_path):
    from safetensors.torch import save_file

    sd = _ct_checkpoint(tmp_path / "m")
    k = "model.layers.1.mlp.down_proj.weight_scale"
    for bad, match in ((sd[k].clone().fill_(float("nan")), r"down_proj\.weight_scale: 128 of 128 scales"),
                       (sd[k][:5], r"down_proj\.weight_scale: shape \(5, 1\) does not match")):
        save_file({**sd, k: bad}, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
        before = _files(tmp_path / "m")
        with pytest.raises(portllm.IncompatiblePatchError, match=match):
            portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), progress=False, log=None)
        assert _files(tmp_path / "m") == before and not (tmp_path / "o").exists()
    save_file(sd, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="compressed-tensors FP8 merge runs on the reference backend only"):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), backend="cpp", progress=False, log=None)
    assert not (tmp_path / "o").exists()
