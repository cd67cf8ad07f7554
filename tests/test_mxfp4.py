"""MXFP4 (GPT-OSS's experts): reading as transformers reads it, the merge against an fp64 oracle written
here from the definition (``portllm.mxfp4``'s docstring), what survives each rounding, and the port into
an MXFP4 checkpoint end to end: loaded by ``from_pretrained``, its logits those of the oracle's weights.

The oracle rounds onto the e2m1 grid by distance (ties to the even code) and finds the format's scale
with ``math.frexp``, independently of the bit tricks the library uses."""

import copy
import hashlib
import json
import math
import os

import pytest
import torch

import portllm
from portllm import mxfp4, ops
from portllm.fp8 import random_bits, stream_key

BACKENDS = [b for b in ("reference", "cpp") if ops.backend_unavailable_reason(b, "cpu", "mxfp4_merge") is None]
GRID = torch.tensor(mxfp4.VALUES, dtype=torch.float64)


# -- the oracle --------------------------------------------------------------------------------------
def o_dequant(blocks, scales):
    lut = torch.cat([GRID, -GRID])
    b = blocks.long()
    v = torch.stack([lut[b % 16], lut[b // 16]], -1).reshape(*blocks.shape[:-2], -1, 32)
    return (v * torch.tensor([[2.0 ** (int(s) - 127) for s in row] for row in scales.reshape(-1, scales.shape[-1])],
                             dtype=torch.float64).reshape(scales.shape)[..., None]).reshape(*blocks.shape[:-2], -1)


def o_fresh(W32):
    """2^ceil(log2(fl32(amax/6))) as a byte, per block."""
    amax = W32.reshape(W32.shape[0], -1, 32).abs().amax(-1)
    d = (amax / 6).double()  # (fp32 division, as the format's quantizer)
    out = torch.zeros(d.shape, dtype=torch.int64)
    for i, x in enumerate(d.reshape(-1).tolist()):
        if x > 0:  # (a subnormal amax/6 rounds up to the smallest normal, 2^-126: byte 1)
            m, e = math.frexp(x)  # x = m·2^e, m in [0.5, 1)
            out.view(-1)[i] = max(1, e - 1 + (m != 0.5) + 127)
    return out


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
    return mag + 8 * torch.signbit(x).long()


def oracle(blocks, scales, Bs, A, fresh, stochastic, key, first=0):
    """One expert: (codes [R, K], bytes [R, G], clipped [R, G], sums [2, 3])."""
    R, G, _ = blocks.shape
    W = o_dequant(blocks, scales)
    acc = W.clone()
    for k in range(Bs.shape[1]):  # added to W one rank at a time, k ascending (signed zeros too)
        acc = acc + Bs[:, k:k + 1].double() * A[k:k + 1].double()
    W1 = acc.float()
    fs = o_fresh(W1)
    if fresh:
        sc, clipped = fs, torch.zeros(R, G, dtype=torch.bool)
    else:
        amax = W1.double().reshape(R, G, 32).abs().amax(-1)
        clipped = amax >= 7 * torch.pow(2.0, scales.double() - 127)
        sc = torch.where(clipped, fs, scales.long())
    x = W1.double().reshape(R, G, 32) / torch.pow(2.0, sc.double() - 127)[..., None]
    index = first + torch.arange(R * G * 32).reshape(R, G, 32)
    sums, codes = [], None
    for st in (stochastic, not stochastic):
        c = o_codes(x, st, key, index).reshape(R, -1)
        codes = c if codes is None else codes
        packed = (c[:, 0::2] + 16 * c[:, 1::2]).to(torch.uint8).reshape(R, G, 16)
        moved, delta = o_dequant(packed, sc) - W, W1.double() - W
        sums.append([float((moved * delta).sum()), float((delta * delta).sum()), float(((moved - delta) ** 2).sum())])
    return codes, sc, clipped, sums


def unpack(blocks):
    b = blocks.long().reshape(blocks.shape[0], -1)
    return torch.stack([b % 16, b // 16], -1).reshape(b.shape[0], -1)


def random_expert(R, G, r, seed, *, delta=0.01, zero_block=True, big_rows=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (R, G, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 130, (R, G), generator=g, dtype=torch.uint8)
    size = float(o_dequant(blocks, scales).abs().mean())
    if zero_block:  # a block of zeros (byte 0): any update leaves its range
        blocks[0, 0], scales[0, 0] = 0, 0
    Bs = torch.randn(R, r, generator=g) * math.sqrt(delta * size / r)
    A = torch.randn(r, G * 32, generator=g) * math.sqrt(delta * size / r)
    Bs[:big_rows] *= 300  # updates far larger than their blocks: these blocks no longer fit their scales
    return blocks, scales, Bs, A


# -- reading ----------------------------------------------------------------------------------------
def test_dequantize_equals_transformers():
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(0, 253, (3, 40, 4), generator=g, dtype=torch.uint8)  # (255 is NaN; above 252 overflows)
    ours = mxfp4.dequantize(blocks, scales)
    for dtype in (torch.float32, torch.bfloat16):
        theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, R]
        assert torch.equal(theirs, ours.transpose(1, 2).to(dtype))
    assert torch.equal(ours.double(), o_dequant(blocks, scales))


@pytest.mark.parametrize("seed", [0, 1])
def test_fresh_quantizer_is_the_formats(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(33, 96, generator=g) * torch.logspace(-3, 2, 33)[:, None]
    W[3, :32] = 0  # a block of zeros: byte 0
    sc = mxfp4.fresh_scales(W)
    assert torch.equal(sc.long(), o_fresh(W)) and int(sc[3, 0]) == 0
    codes = unpack(mxfp4.quantize(W, sc))
    x = W.double().reshape(33, 3, 32) / torch.pow(2.0, sc.double() - 127)[..., None]
    assert torch.equal(codes, o_codes(x, False, 0, None).reshape(33, -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_round_exact_ties_and_signed_zeros(backend):
    """W' landing exactly on every midpoint of the grid (on 0: 0 + −0 is +0; −0.1 rounds to −0; in (6, 7),
    which saturates without clipping), through each backend with kept scales."""
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.5, -6.5,
                      0.0, -0.0, 0.1, -0.1, 6.0, -4.0, 0.5, 3.0, 1.0, -1.5, 2.0, -3.0, 4.0, 1.5, -2.0, 0.75])
    want = [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 7, 15, 0, 0, 0, 8, 7, 14, 1, 5, 2, 11, 4, 13, 6, 3, 12, 2]
    for byte in (1, 127, 131, 250):
        blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)  # W = 0: W' = the update, exactly
        scales = torch.tensor([[byte]], dtype=torch.uint8)
        A = (x * 2.0 ** (byte - 127))[None].float()
        qb, qs, _, clipped = ops.mxfp4_merge(blocks, scales, torch.ones(1, 1), A, backend=backend)
        assert unpack(qb)[0].tolist() == want and int(qs) == byte and not bool(clipped.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fresh", [False, True])
def test_merge_at_the_extreme_scale_bytes(backend, fresh):
    g = torch.Generator().manual_seed(9)
    blocks = torch.randint(0, 256, (6, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.tensor([[1, 2], [1, 1], [250, 251], [252, 250], [3, 252], [126, 128]], dtype=torch.uint8)
    # updates of about 1% of each row's own blocks
    size = o_dequant(blocks, scales).abs().amax(-1, keepdim=True).float()
    Bs, A = torch.randn(6, 2, generator=g) * 0.01 * size, torch.randn(2, 64, generator=g)
    if fresh:  # (row 4's update lifts a block at 6·2^125 to byte 253, beyond MXFP4's finite range: merge_
        Bs[3] = 0  # refuses that, test_merge_refuses_a_result_beyond_mxfp4s_range; the op reports it as is)
    qb, qs, sums, clipped = ops.mxfp4_merge(blocks, scales, Bs, A, fresh=fresh, backend=backend)
    codes, sc, clip, want = oracle(blocks, scales, Bs, A, fresh, False, 0)
    assert torch.equal(unpack(qb), codes) and torch.equal(qs.long(), sc) and torch.equal(clipped, clip)


def test_merge_refuses_a_result_beyond_mxfp4s_range():
    from portllm.merge import NonFiniteMergeError

    blocks = torch.full((1, 1, 16), 0x77, dtype=torch.uint8)  # every code 6, at byte 252: 6·2^125
    scales = torch.tensor([[[252]]], dtype=torch.uint8)
    A = torch.full((1, 32), 2.0 ** 125)
    with pytest.raises(NonFiniteMergeError, match=r"model.x_blocks, expert 0: .*beyond what MXFP4 holds finite"):
        mxfp4.merge_(blocks[None], scales, {0: (torch.ones(1, 1), A, 1.0)}, name="model.x")


def test_nearest_ties_go_to_the_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 7.0, -0.1, 0.0], dtype=torch.float64)
    want = [0, 2, 2, 4, 4, 6, 6, 8, 14, 7, 8, 0]  # (7 saturates to 6; −0.1 is −0)
    assert mxfp4.round_e2m1(x).tolist() == want


# -- the merge --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("R,G,r", [(37, 3, 5), (1, 1, 1), (64, 2, 16)])
def test_merge_equals_fp64_oracle(backend, fresh, stochastic, R, G, r):
    blocks, scales, Bs, A = random_expert(R, G, r, seed=R + G + r, big_rows=min(R, 3))
    b0, s0 = blocks.clone(), scales.clone()
    key, first = stream_key(7), 12345
    qb, qs, sums, clipped = ops.mxfp4_merge(blocks, scales, Bs, A, fresh=fresh, stochastic=stochastic, key=key,
                                            first=first, backend=backend)
    codes, sc, clip, want = oracle(blocks, scales, Bs, A, fresh, stochastic, key, first)
    assert torch.equal(blocks, b0) and torch.equal(scales, s0)  # inputs untouched
    assert torch.equal(unpack(qb), codes)
    assert torch.equal(qs.long(), sc) and torch.equal(clipped, clip)
    assert fresh or bool(clip.any())  # (the big rows made some blocks not fit)
    torch.testing.assert_close(sums, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=0)


def realistic_expert(R, G, r, seed, rel=0.01):
    """Weights quantized by the format's quantizer, and an update of ``rel`` of their norm."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(R, G * 32, generator=g) * 0.05
    scales = mxfp4.fresh_scales(W)
    blocks = mxfp4.quantize(W, scales)
    Bs, A = torch.randn(R, r, generator=g), torch.randn(r, G * 32, generator=g)
    Bs *= rel * float(W.norm() / (Bs @ A).norm())
    return blocks, scales, Bs, A


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("fresh", [False, True])
def test_cpp_cpu_paths_equal_the_reference(isa, fresh, monkeypatch):
    from portllm import _ext

    if "cpp" not in BACKENDS:
        pytest.skip(ops.backend_unavailable_reason("cpp", "cpu", "mxfp4_merge"))
    monkeypatch.setenv("PORTLLM_CPU_ISA", isa)
    if _ext.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa} path")
    blocks, scales, Bs, A = random_expert(53, 5, 7, seed=11, big_rows=4)
    for stochastic in (False, True):
        got = ops.mxfp4_merge(blocks, scales, Bs, A, fresh=fresh, stochastic=stochastic, key=stream_key(2), first=64,
                              backend="cpp")
        want = ops.mxfp4_merge(blocks, scales, Bs, A, fresh=fresh, stochastic=stochastic, key=stream_key(2), first=64,
                               backend="reference")
        for g_, w_ in zip(got[:2] + got[3:], want[:2] + want[3:]):
            assert torch.equal(g_, w_)
        torch.testing.assert_close(got[2], want[2], rtol=1e-9, atol=0)


def test_nearest_erases_a_small_update_and_stochastic_keeps_it_over_seeds():
    blocks, scales, Bs, A = realistic_expert(128, 4, 8, seed=3)
    factors = {0: (Bs, A, 1.0)}
    near = mxfp4.merge_(blocks[None], scales[None], factors, rounding="nearest")
    assert near.kept.retained < 0.5  # one mantissa bit: a 1% update mostly rounds away
    kept = []
    for seed in range(64):
        res = mxfp4.merge_(blocks[None], scales[None], factors, rounding="stochastic", seed=seed)
        # the report's figure is the direct computation on what was written
        W = o_dequant(blocks, scales)
        W1 = (W + Bs.double() @ A.double()).float().double()  # (r=8 sums: within the fp32 rounding of W')
        moved, delta = o_dequant(res.blocks[0], res.scales[0]) - W, W1 - W
        assert res.kept.retained == pytest.approx(float((moved * delta).sum() / (delta * delta).sum()), rel=1e-6)
        kept.append(res.kept.retained)
    assert sum(kept) / len(kept) >= 0.95
    assert near.other.retained == pytest.approx(mxfp4.merge_(blocks[None], scales[None], factors,
                                                             rounding="stochastic").kept.retained, rel=1e-12)


def test_refuse_names_the_block_and_nan_update_refused():
    blocks, scales, Bs, A = random_expert(8, 2, 2, seed=5, big_rows=1)
    with pytest.raises(mxfp4.ClippedBlockError, match=r"gate_blocks: \d+ block\(s\) of expert 2 .* row 0"):
        mxfp4.merge_(torch.stack([blocks] * 3), torch.stack([scales] * 3), {2: (Bs, A, 1.0)}, on_clip="refuse",
                     name="gate")
    from portllm.merge import NonFiniteMergeError

    with pytest.raises(NonFiniteMergeError, match="gate_blocks, expert 0"):
        mxfp4.merge_(blocks[None], scales[None], {0: (Bs * 1e30, A * 1e30, 1.0)}, name="gate")


# -- the port ---------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _digest(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        with open(os.path.join(d, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def mx_checkpoint(tmp_path_factory):
    """A tiny GPT-OSS in bf16 with its experts stored MXFP4 (the format's quantizer), and a PEFT adapter
    (q_proj and both expert parameters) whose update is about 1% of the weights."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("mxfp4")
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                    head_dim=16, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                    num_hidden_layers=2, max_position_embeddings=64,
                                    layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model = model.to(torch.bfloat16)
    ckpt = str(root / "model")
    model.save_pretrained(ckpt)
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    out = {}
    for k, t in sd.items():
        if k.endswith(tuple(EXPERTS)):
            W = t.transpose(1, 2).float()  # GPT-OSS holds [E, in, out]; the blocks are [E, out, in]
            sc = torch.stack([mxfp4.fresh_scales(w) for w in W])
            out[k + "_blocks"] = torch.stack([mxfp4.quantize(w, s) for w, s in zip(W, sc)])
            out[k + "_scales"] = sc
        else:
            out[k] = t
    save_file(out, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(ckpt, "config.json")) as f:
        c = json.load(f)
    c["quantization_config"] = {"quant_method": "mxfp4",
                                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"]}
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    base = load(ckpt)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS)
    pm = peft.get_peft_model(copy.deepcopy(base).float(), lcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.011  # s·√r·σ² = 1% of the weights' 0.05
    adapter = str(root / "adapter")
    pm.save_pretrained(adapter)
    return ckpt, adapter, base, pm


def load(d):
    return transformers.AutoModelForCausalLM.from_pretrained(
        d, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16).eval()


def oracle_model(base, ckpt, adapter, stochastic, seed):
    """The base as transformers loads it, with every expert replaced by the oracle's merge (policy reuse)
    and q_proj merged as every bf16 port merges (one rounding of the exact sum)."""
    import zlib

    from safetensors.torch import load_file

    from portllm.patch import Patch

    patch = Patch.load(adapter).for_checkpoint(ckpt, load_file(os.path.join(ckpt, "model.safetensors")).keys())
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for p in {n.rpartition("_blocks")[0] for n in patch if "_blocks[" in n}:
        key = stream_key(zlib.crc32(f"{seed}|{p}_blocks".encode()))
        blocks, scales = sd[p + "_blocks"], sd[p + "_scales"]
        E, R, G, _ = blocks.shape
        new = []
        for e in range(E):
            m = patch[f"{p}_blocks[{e}]"]
            codes, sc, _, _ = oracle(blocks[e], scales[e], m.B.float() * m.scale, m.A.float(), False, stochastic, key,
                                     e * R * G * 32)
            packed = (codes[:, 0::2] + 16 * codes[:, 1::2]).to(torch.uint8).reshape(R, G, 16)
            new.append(o_dequant(packed, sc))
        with torch.no_grad():
            params[p].copy_(torch.stack(new).transpose(1, 2).to(torch.bfloat16))
    for n in patch:
        if n.endswith("q_proj"):
            m = patch[n]
            W = params[n + ".weight"]
            with torch.no_grad():
                W.copy_((W.double() + m.scale * (m.B.double() @ m.A.double())).to(torch.bfloat16))
    return model


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_port_loads_in_transformers_with_the_oracles_logits(mx_checkpoint, tmp_path, rounding):
    ckpt, adapter, base, _ = mx_checkpoint
    before = (_digest(ckpt), _digest(adapter))
    out = str(tmp_path / "out")
    res = portllm.port(ckpt, adapter, out, rounding=rounding, seed=3, allow_low_retention=True, progress=False,
                       log=None)
    assert res.merged == 2 + 4  # q_proj in both layers, and the four packed expert parameters
    assert (_digest(ckpt), _digest(adapter)) == before
    got = load(out)
    want = oracle_model(base, ckpt, adapter, rounding == "stochastic", 3)
    gs, ws = got.state_dict(), want.state_dict()
    assert gs.keys() == ws.keys()
    for k in ws:
        assert torch.equal(gs[k], ws[k]), k
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    peft_model = mx_checkpoint[3]  # the experts' updates are PEFT's own (not just the oracle's reading of them)
    from portllm.patch import Patch

    from safetensors.torch import load_file

    patch = Patch.load(adapter).for_checkpoint(ckpt, load_file(os.path.join(ckpt, "model.safetensors")).keys())
    checked = 0
    for name, mod in peft_model.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            param = name.replace("base_model.model.", "").replace(".base_layer", "") + "." + mod.parameter_name
            delta = mod.get_delta_weight("default").detach()  # [E, in, out]: GPT-OSS holds its experts transposed
            for e in range(delta.shape[0]):
                m = patch[f"{param}_blocks[{e}]"]
                torch.testing.assert_close(m.scale * (m.B @ m.A), delta[e].T, rtol=1e-5, atol=1e-7)
                checked += 1
    assert checked == 2 * 2 * 4  # layers x expert parameters x experts
    rep = json.load(open(os.path.join(out, "portllm_port.json")))["mxfp4"]
    assert rep["rounding"] == rounding and set(rep["parameters"]) == {f"model.layers.{i}.{p}" for i in (0, 1)
                                                                      for p in EXPERTS}
    if rounding == "stochastic":
        assert rep["retained"] > 0.8 and rep["nearest"]["retained"] < 0.5


def test_low_retention_refused_with_what_stochastic_keeps(mx_checkpoint, tmp_path):
    from portllm.port_mxfp4 import LowRetentionError

    ckpt, adapter, _, _ = mx_checkpoint
    out = tmp_path / "out"
    with pytest.raises(LowRetentionError, match=r"only \d+\.\d% of the patch survived .* stochastic rounding would "
                                                r"keep \d+\.\d%.*--rounding stochastic.*nothing written"):
        portllm.port(ckpt, adapter, str(out), progress=False, log=None)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p != "out"]


def test_cli_port_stochastic(mx_checkpoint, tmp_path, capsys):
    from portllm.cli import main

    ckpt, adapter, _, _ = mx_checkpoint
    assert main(["port", "--model", ckpt, "--patch", adapter, "--out", str(tmp_path / "o"), "--rounding",
                 "stochastic", "--fp4-scales", "fresh"]) == 0
    assert "MXFP4 (stochastic rounding, scales fresh)" in capsys.readouterr().out


def _variant(ckpt, tmp_path, edit=None, config=None):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(ckpt, d)
    sd = load_file(os.path.join(d, "model.safetensors"))
    if edit:
        edit(sd)
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.load(open(os.path.join(d, "config.json")))
        config(c)
        json.dump(c, open(os.path.join(d, "config.json"), "w"))
    return str(d)


K = "model.layers.1.mlp.experts.down_proj"


def _nan_scale(sd):
    sd[K + "_scales"][0, 1, 0] = 255


def _scale_shape(sd):
    sd[K + "_scales"] = sd[K + "_scales"][:, :, :1].contiguous()


def _blocks_dtype(sd):
    sd[K + "_blocks"] = sd[K + "_blocks"].to(torch.int16)


def _huge_scale(sd):
    sd[K + "_scales"][2, 5, 1] = 253


def _unknown(c):
    c["quantization_config"]["quant_method"] = "nvfp5"


@pytest.mark.parametrize("edit,config,msg,kw", [
    (_nan_scale, None, rf"tensor {K}_scales: 1 of 512 block scales are NaN", {}),
    (_scale_shape, None, rf"tensor {K}_scales: expected uint8 \(4, 64, 2\)", {}),
    (_blocks_dtype, None, rf"tensor {K}_blocks: expected uint8", {}),
    (_huge_scale, None, rf"tensor {K}_scales: 1 of 512 block scales are 2\^126 or more", {}),
    (None, _unknown, r"quant_method 'nvfp5'", {}),
    (None, None, r"backend 'cuda' is not available for mxfp4_merge", {"backend": "cuda"}),
    (None, None, r"written MXFP4; portllm does not write it dequantized", {"dtype": "bfloat16"}),
    (None, None, r"down_proj_blocks: \d+ block\(s\) of expert \d .*do not fit", {"fp4_clip": "refuse",
                                                                              "allow_low_retention": True}),
])
def test_bad_inputs_named_and_nothing_written(mx_checkpoint, tmp_path, edit, config, msg, kw):
    ckpt, adapter, _, _ = mx_checkpoint
    if kw.get("fp4_clip"):  # an update too large for the blocks' scales
        adapter = _big_adapter(adapter, tmp_path)
    bad = _variant(ckpt, tmp_path, edit, config) if (edit or config) else ckpt
    before = (_digest(bad), _digest(adapter))
    with pytest.raises((ValueError, RuntimeError), match=msg) as err:
        portllm.port(bad, adapter, str(tmp_path / "out"), progress=False, log=None, **kw)
    assert "\n" not in str(err.value)
    assert (_digest(bad), _digest(adapter)) == before and not (tmp_path / "out").exists()


def _big_adapter(adapter, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "big"
    shutil.copytree(adapter, d)
    sd = load_file(os.path.join(d, "adapter_model.safetensors"))
    save_file({k: v * 30 if "lora_B" in k else v for k, v in sd.items()}, os.path.join(d, "adapter_model.safetensors"))
    return str(d)


def test_streamed_in_chunks_and_whole_give_the_same_bytes(mx_checkpoint, tmp_path, monkeypatch):
    """Blocks before scales (as save_file orders them) stream in chunks of experts; scales first go whole:
    one expert per chunk, the default chunks, and the whole path write the same tensors and report."""
    from safetensors.torch import load_file

    from portllm import port_stream
    from portllm.safetensors_io import SafetensorsWriter

    ckpt, adapter, _, _ = mx_checkpoint
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    assert list(sd).index(K + "_blocks") < list(sd).index(K + "_scales")
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    for f in os.listdir(ckpt):
        if f != "model.safetensors":
            with open(os.path.join(ckpt, f), "rb") as src, open(flipped / f, "wb") as dst:
                dst.write(src.read())
    order = sorted(sd, key=lambda k: (k.replace("_scales", "_a").replace("_blocks", "_b")))  # scales first
    with SafetensorsWriter(str(flipped / "model.safetensors"), [(k, sd[k].dtype, tuple(sd[k].shape)) for k in order],
                           {"format": "pt"}) as w:
        for k in order:
            w.write(k, sd[k])
    outs = {}
    for name, model, chunk in (("default", ckpt, None), ("per-expert", ckpt, 1), ("whole", str(flipped), None)):
        if chunk is not None:
            monkeypatch.setattr(port_stream, "CHUNK_BYTES", chunk)
        out = str(tmp_path / name)
        portllm.port(model, adapter, out, rounding="stochastic", seed=5, progress=False, log=None)
        monkeypatch.setattr(port_stream, "CHUNK_BYTES", 16 << 20)
        outs[name] = (load_file(os.path.join(out, "model.safetensors")),
                      json.load(open(os.path.join(out, "portllm_port.json")))["mxfp4"])
    want, rep = outs["default"]
    assert any(not torch.equal(want[k], sd[k]) for k in want if k.endswith("_blocks"))  # (the port changed codes)
    for name, (got, r) in outs.items():
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
        assert r["retained"] == pytest.approx(rep["retained"], rel=1e-9), name
