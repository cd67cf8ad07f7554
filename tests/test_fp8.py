"""Block-FP8 merges (portllm.fp8): dequantize, add in fp32, requantize with fresh block scales; against a
float64 reference, stochastic rounding unbiased, the retained fraction as computed directly."""

import pytest
import torch

from portllm import fp8

BLOCK = (128, 128)


def _weight(M, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(M, N, generator=g) * 0.02
    return fp8.quantize(W, BLOCK)


def _factors(M, N, r, rel, q, s, seed=1):
    """Factors whose update is about ``rel`` of the weight's RMS."""
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(M, r, generator=g), torch.randn(r, N, generator=g)
    W = fp8.dequantize(q, s, BLOCK)
    scale = rel * float(W.pow(2).mean().sqrt()) / float((B @ A).pow(2).mean().sqrt())
    return B, A, torch.full((r,), scale)


def _reference(q, s, B, A, sc):
    """float64 dequantize and add, then transformers' quantizer (fp32 scale = 448 / block amax, scale_inv =
    1 / scale, q = clamp(W · scale) rounded to nearest even)."""
    W = fp8.dequantize(q, s, BLOCK).double() + (B.double() * sc.double()) @ A.double()
    M, N = W.shape
    bm, bn = BLOCK
    pad = torch.nn.functional.pad(W.abs(), (0, (-N) % bn, 0, (-M) % bm))
    amax = pad.reshape(pad.shape[0] // bm, bm, pad.shape[1] // bn, bn).amax(dim=(1, 3))
    scale = 448 / amax.float()
    x = W * fp8._expand(scale.double(), M, N, BLOCK)
    return x.clamp(-448, 448).to(torch.float8_e4m3fn), (1.0 / scale).float()


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (129, 1000), (5, 7)])
def test_nearest_matches_float64_reference(shape):
    M, N = shape
    q, s = _weight(M, N)
    B, A, sc = _factors(M, N, 16, 0.05, q, s)
    q0, s0 = q.clone(), s.clone()
    out_q, out_s, stats = fp8.merge_(q, s, B, A, sc, BLOCK)
    assert torch.equal(q, q0) and torch.equal(s, s0)  # inputs untouched
    ref_q, ref_s = _reference(q, s, B, A, sc)
    # fp32 accumulation against float64: a scale may differ in its last bit, a code by one step where
    # the exact value sits within fp32 rounding of a tie; nowhere else.
    assert torch.allclose(out_s, ref_s, rtol=2 ** -22, atol=0)
    def ordered(t):  # e4m3 codes in the order of their values: one apart = one step
        c = t.view(torch.uint8).to(torch.int16)
        return torch.where(c >= 128, -(c & 0x7F), c)

    diff = (ordered(out_q) - ordered(ref_q)).abs()
    assert float((diff > 0).float().mean()) <= 1e-3 and int(diff.max()) <= 1


def test_stochastic_rounding_is_unbiased_and_seeded():
    M, N = 128, 256
    q, s = _weight(M, N, seed=3)
    B, A, sc = _factors(M, N, 8, 0.01, q, s, seed=4)
    target = fp8.dequantize(q, s, BLOCK).double() + (B.double() * sc.double()) @ A.double()
    acc = torch.zeros_like(target)
    for seed in range(64):
        qq, ss, _ = fp8.merge_(q, s, B, A, sc, BLOCK, rounding="stochastic", seed=seed)
        acc += fp8.dequantize(qq, ss, BLOCK).double()
    mean = acc / 64
    rel = float((mean - target).norm() / target.norm())
    assert rel <= 0.02, rel
    a = fp8.merge_(q, s, B, A, sc, BLOCK, rounding="stochastic", seed=7)
    b = fp8.merge_(q, s, B, A, sc, BLOCK, rounding="stochastic", seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_retained_fraction_matches_direct_computation():
    M, N = 256, 384
    q, s = _weight(M, N, seed=5)
    B, A, sc = _factors(M, N, 16, 0.01, q, s, seed=6)
    for rounding in fp8.ROUNDINGS:
        out_q, out_s, stats = fp8.merge_(q, s, B, A, sc, BLOCK, rounding=rounding, seed=1)
        W = fp8.dequantize(q, s, BLOCK).double()
        W1 = (W + (B.float() * sc).double() @ A.double()).float()  # (float64 sum, one rounding to fp32)
        delta = W1.double() - W
        moved = fp8.dequantize(out_q, out_s, BLOCK).double() - W
        assert stats.retained == pytest.approx(float((moved * delta).sum() / (delta * delta).sum()), rel=1e-6)
        assert stats.noise == pytest.approx(float((moved - delta).norm() / delta.norm()), rel=1e-6)
    near = fp8.merge_(q, s, B, A, sc, BLOCK)[2]
    sto = fp8.merge_(q, s, B, A, sc, BLOCK, rounding="stochastic")[2]
    assert sto.retained > near.retained  # a 1% update: nearest erases much of it, stochastic keeps it on average


def test_bad_scales_are_named():
    q, s = _weight(256, 256)
    with pytest.raises(fp8.FP8FormatError, match=r"layers\.0\.q_proj\.weight_scale_inv: shape \(1, 2\)"):
        fp8.check_block_scales(q, s[:1], BLOCK, "layers.0.q_proj.weight")
    bad = s.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(fp8.FP8FormatError, match="1 of 4 block scales are not finite and positive"):
        fp8.check_block_scales(q, bad, BLOCK, "w")
    bad[1, 1] = -1.0
    with pytest.raises(fp8.FP8FormatError, match="not finite and positive"):
        fp8.check_block_scales(q, bad, BLOCK, "w")


def _fp8_checkpoint(path, seed=0):
    """A tiny Llama whose Linear weights (not lm_head) are block-FP8, as transformers' fp8 format holds them:
    ``weight`` float8_e4m3fn and ``weight_scale_inv`` fp32 blocks of 128x128."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            q, s = fp8.quantize(v.float(), BLOCK)
            sd[k], sd[k + "_scale_inv"] = q, s
        else:
            sd[k] = v.to(torch.bfloat16)
    path.mkdir()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    c["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(c))
    return sd


def _patch(seed=1):
    from portllm.patch import Patch, PatchModule

    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(2):
        for name, (o, n) in {"self_attn.q_proj": (256, 256), "mlp.down_proj": (256, 384)}.items():
            mods[f"model.layers.{i}.{name}"] = PatchModule(torch.randn(o, 8, generator=g) * 0.05,
                                                           torch.randn(8, n, generator=g) * 0.05, 0.5)
    return Patch(mods)


@pytest.mark.parametrize("rounding", fp8.ROUNDINGS)
def test_port_onto_block_fp8_checkpoint(tmp_path, rounding):
    """The port writes FP8 in the input's format: each patched weight and its scales are fp8.merge_'s,
    every other tensor is the input's, byte for byte; the report states the retention."""
    import json

    import portllm
    from safetensors.torch import load_file

    sd = _fp8_checkpoint(tmp_path / "m")
    patch = _patch()
    lines = []
    portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), rounding=rounding, seed=3, progress=False,
                 log=lines.append)
    out = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert out.keys() == sd.keys()
    merged = 0
    for k, v in sd.items():
        name = k.removesuffix(".weight")
        if k.endswith(".weight") and name in patch.modules:
            m = patch[name]
            assert out[k].dtype == torch.float8_e4m3fn
            assert not torch.equal(out[k].view(torch.uint8), v.view(torch.uint8))
            merged += 1
        elif not k.endswith("_scale_inv") or k.removesuffix("_scale_inv").removesuffix(".weight") not in patch.modules:
            assert out[k].dtype == v.dtype and torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k
    assert merged == 4
    # Nearest rounding is deterministic: the port's bytes are fp8.merge_'s for the same inputs.
    if rounding == "nearest":
        for name, m in patch.items():
            k = name + ".weight"
            q, s, _ = fp8.merge_(sd[k], sd[k + "_scale_inv"], m.B, m.A, torch.full((8,), 0.5), BLOCK)
            assert torch.equal(out[k].view(torch.uint8), q.view(torch.uint8)) and torch.equal(out[k + "_scale_inv"], s)
    info = json.loads((tmp_path / "o" / "portllm_port.json").read_text())
    assert info["fp8"]["rounding"] == rounding and 0 < info["fp8"]["retained"] <= 1.5
    assert any("survived requantization" in x for x in lines)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    # transformers loads it (on a CPU by dequantizing to bf16): the merged weights as the port wrote them.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    k = "model.layers.1.mlp.down_proj.weight"
    w = model.state_dict()[k]
    assert torch.equal(w, fp8.dequantize(out[k], out[k + "_scale_inv"], BLOCK).to(w.dtype))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert bool(torch.isfinite(model(input_ids=ids).logits).all())


def test_fp8_port_refusals(tmp_path):
    import json

    import portllm

    sd = _fp8_checkpoint(tmp_path / "m")
    patch = _patch()
    from safetensors.torch import save_file

    bad = dict(sd)
    bad["model.layers.1.mlp.down_proj.weight_scale_inv"] = sd["model.layers.1.mlp.down_proj.weight_scale_inv"].clone()
    bad["model.layers.1.mlp.down_proj.weight_scale_inv"][0, 1] = float("nan")
    save_file(bad, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(portllm.IncompatiblePatchError, match=r"layers\.1\.mlp\.down_proj\.weight_scale_inv: 1 of 6"):
        portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), progress=False, log=None)
    assert not (tmp_path / "o").exists()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(portllm.IncompatiblePatchError, match=r"quant_method 'gptq'.*16-bit release"):
        portllm.port(str(tmp_path / "m"), patch, str(tmp_path / "o"), progress=False, log=None)


def test_cli_port_fp8_stochastic(tmp_path, capsys):
    from portllm import cli

    _fp8_checkpoint(tmp_path / "m")
    _patch().save(tmp_path / "p")
    assert cli.main(["port", "--model", str(tmp_path / "m"), "--patch", str(tmp_path / "p"), "--out",
                     str(tmp_path / "o"), "--rounding", "stochastic", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert "FP8 (stochastic rounding, block-FP8, blocks 128x128):" in out and "survived requantization" in out


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_quantize_is_transformers_quantizer(scale_fmt):
    """fp8.quantize gives transformers' own Fp8Quantize bits: codes and inverse scales (ue8m0: powers of two)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    class _Q:
        quantization_config = FineGrainedFP8Config(weight_block_size=[128, 128], scale_fmt=scale_fmt)

    g = torch.Generator().manual_seed(9)
    W = torch.randn(256, 384, generator=g) * 0.03
    W[:128, :128] = 0  # a block of zeros
    theirs = Fp8Quantize(_Q())._quantize_one("m.weight", W.clone())
    q, inv = fp8.quantize(W, BLOCK, scale_fmt=scale_fmt)
    assert torch.equal(q.view(torch.uint8), theirs["m.weight"].view(torch.uint8))
    assert torch.equal(inv, theirs["m.weight_scale_inv"].float())


def test_fp8_refusals_before_any_write(tmp_path):
    """Narrow block scales and a backend that cannot run the CPU merge are refused before any output."""
    import portllm
    from portllm.ops import BackendUnavailableError
    from safetensors.torch import save_file

    sd = _fp8_checkpoint(tmp_path / "m")
    with pytest.raises(BackendUnavailableError):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), backend="cuda", device="cpu",
                     progress=False, log=None)
    assert not (tmp_path / "o").exists()
    bad = dict(sd)
    k = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    bad[k] = sd[k].to(torch.bfloat16)
    save_file(bad, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(portllm.IncompatiblePatchError, match=r"q_proj\.weight_scale_inv: dtype torch\.bfloat16"):
        portllm.port(str(tmp_path / "m"), _patch(), str(tmp_path / "o"), progress=False, log=None)
    assert not (tmp_path / "o").exists()


FP8_BACKENDS = ["reference", "cpp"]
ISAS = ["native", "avx512", "avx2", "generic"]


def _fp8_backend(name, isa, monkeypatch):
    from portllm import _ext, ops

    reason = ops.backend_unavailable_reason(name, "cpu", "fp8_merge")
    if reason is not None:
        pytest.skip(reason)
    if isa != "native":
        if name != "cpp":
            pytest.skip("the ISA paths are the C++ kernel's")
        monkeypatch.setenv("PORTLLM_CPU_ISA", isa)
        if _ext.cpu_isa() != isa:
            pytest.skip(f"this CPU has no {isa} path")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("rounding", fp8.ROUNDINGS)
@pytest.mark.parametrize("case", [((5, 7), (128, 128), 3), ((129, 1000), (128, 128), 16), ((300, 200), (32, 48), 5),
                                  ((64, 130), (16, 16), 1)], ids=lambda c: f"{c[0][0]}x{c[0][1]}b{c[1][0]}r{c[2]}")
def test_fp8_merge_every_backend_is_the_reference_bit_for_bit(case, rounding, backend, isa, monkeypatch):
    """Every output code and scale of each backend and CPU path is the reference's (both roundings;
    odd shapes, partial blocks, bf16 factors for one case); the sums agree; inputs untouched."""
    from portllm import ops, reference

    _fp8_backend(backend, isa, monkeypatch)
    (M, N), block, r = case
    g = torch.Generator().manual_seed(M * N + r)
    q, s = fp8.quantize(torch.randn(M, N, generator=g) * 0.02, block)
    dt = torch.bfloat16 if r == 5 else torch.float32
    B, A = (torch.randn(M, r, generator=g) * 0.05).to(dt), (torch.randn(r, N, generator=g) * 0.05).to(dt)
    sc = torch.rand(r, generator=g) + 0.5
    q0, s0 = q.clone(), s.clone()
    key = fp8.stream_key(11)
    got = ops.fp8_merge(q, s, B, A, sc, block, stochastic=rounding == "stochastic", key=key, backend=backend)
    Bs = B.float() * sc[None, :]
    want = reference.fp8_merge(q, s, Bs, A.float(), block, rounding == "stochastic", key)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=0)
    assert not torch.equal(got[0].view(torch.uint8), q.view(torch.uint8))


def _grid_values():
    """fp32 values at, between and around every e4m3 grid point of [0, 448], both signs: the grid,
    the midpoints (ties), one fp32 ulp either side of each midpoint, and ±0."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448 (0x7F is NaN)
    mids = (codes[:-1].double() + codes[1:].double()) / 2
    mids = mids.float()
    up = torch.nextafter(mids, torch.full_like(mids, 1e9))
    down = torch.nextafter(mids, torch.zeros_like(mids))
    v = torch.cat([codes, mids, up, down])
    return torch.cat([v, -v, torch.tensor([448.0])])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_fp8_merge_rounds_like_torch_at_every_tie(backend, isa, monkeypatch):
    """W' set to each grid value, tie and near-tie (one block with amax 448: scale 1): nearest gives
    torch's own cast to e4m3 bit for bit (ties to even, subnormals, signed zeros); stochastic rounds
    only to one of the two neighbours, and exact grid values to themselves."""
    from portllm import ops

    _fp8_backend(backend, isa, monkeypatch)
    x = _grid_values()
    M = x.numel()
    q = torch.zeros(M, 1, dtype=torch.float8_e4m3fn)
    s = torch.ones(1, 1)
    B, A = x[:, None].clone(), torch.ones(1, 1)
    near = ops.fp8_merge(q, s, B, A, torch.ones(1), (M, 1), backend=backend)
    x = x + 0.0  # W' = 0 + x: -0.0 comes out +0.0
    assert float(near[1]) == 1.0
    assert torch.equal(near[0].view(torch.uint8)[:, 0], x.to(torch.float8_e4m3fn).view(torch.uint8))
    sto = ops.fp8_merge(q, s, B, A, torch.ones(1), (M, 1), stochastic=True, key=fp8.stream_key(3), backend=backend)
    got = sto[0].float()[:, 0]
    exact = x.to(torch.float8_e4m3fn).float() == x
    assert torch.equal(got[exact], x[exact])
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    floor = grid[torch.searchsorted(grid, x.abs(), right=True) - 1]
    ceil = grid[torch.clamp(torch.searchsorted(grid, x.abs()), max=grid.numel() - 1)]
    assert bool(((got.abs() == floor) | (got.abs() == ceil)).all())  # one of |x|'s two grid neighbours
    assert bool((torch.signbit(got) == torch.signbit(x)).all())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_fp8_merge_nan_code_and_huge_block(backend, isa, monkeypatch):
    """A NaN code in q (a NaN in the block: scale 1 for that block, as torch's amax gives) and a block
    larger than the weight: every backend still gives the reference's bits."""
    from portllm import ops, reference

    _fp8_backend(backend, isa, monkeypatch)
    g = torch.Generator().manual_seed(5)
    q, s = fp8.quantize(torch.randn(40, 70, generator=g) * 0.02, (32, 32))
    q.view(torch.uint8)[3, 5] = 0x7F
    B, A, sc = torch.randn(40, 2, generator=g) * 0.01, torch.randn(2, 70, generator=g) * 0.01, torch.ones(2)
    for block, scales in (((32, 32), s), ((4096, 4096), torch.full((1, 1), float(s.max())))):
        got = ops.fp8_merge(q, scales, B, A, sc, block, backend=backend)
        want = reference.fp8_merge(q, scales, B.float() * sc, A, block, False, 0)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


def test_ue8m0_merge_is_the_quantizer_of_the_merged_weight():
    """ue8m0 scales: the merge's codes and power-of-two scales are transformers' quantizer (``quantize``,
    tested against Fp8Quantize) applied to the merged weight, band by band."""
    q, s = fp8.quantize(torch.randn(300, 200, generator=torch.Generator().manual_seed(2)) * 0.02, BLOCK,
                        scale_fmt="ue8m0")
    B, A, sc = _factors(300, 200, 4, 0.05, q, s, seed=3)
    out_q, out_s, _ = fp8.merge_(q, s, B, A, sc, BLOCK, scale_fmt="ue8m0")
    W1 = (fp8.dequantize(q, s, BLOCK).double() + (B * sc).double() @ A.double()).float()
    for i0 in range(0, 300, 128):
        want_q, want_s = fp8.quantize(W1[i0:i0 + 128], BLOCK, scale_fmt="ue8m0")
        assert torch.equal(out_s[i0 // 128], want_s[0])
        diff = (out_q[i0:i0 + 128].float() - want_q.float()).abs() > 0
        assert float(diff.float().mean()) <= 1e-3  # (the float64 sum's order against matmul's: a tie at most)
    assert bool((torch.log2(out_s) == torch.log2(out_s).round()).all())
