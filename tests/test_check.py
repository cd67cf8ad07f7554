"""The portability check (``portllm.check``): its figures recomputed here from merged models, prompt by
prompt (no batching, no padding, no hooks); a release that is its own base scores 1; a release that
already holds the patch is predicted harmed by it; bad prompts and patches refused in one line; the
CLI, and ``port --check`` refusing a predicted harm unless forced."""

import copy
import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import portllm  # noqa: E402
from portllm import check  # noqa: E402
from portllm.experiment import data  # noqa: E402
from portllm.patch import Patch, PatchModule  # noqa: E402

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def _model(seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(data.VOCAB), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)  # peaked next-token distributions: greedy answers that mean something
    return m


def _patch(model, seed=1, rel=0.5):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i in range(2):
        for t in TARGETS:
            W = dict(model.named_parameters())[f"model.layers.{i}.{t}.weight"]
            B, A = torch.randn(W.shape[0], 4, generator=g), torch.randn(4, W.shape[1], generator=g)
            s = rel * float(W.detach().norm() / (B @ A).norm())
            mods[f"model.layers.{i}.{t}"] = PatchModule(B, A, s)
    return Patch(mods)


def _save(model, d):
    model.save_pretrained(d)
    data.make_tokenizer().save_pretrained(d)
    return str(d)


def _merged(model, patch, times=1.0):
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, pm in patch.items():
            params[name + ".weight"] += times * pm.delta()
    return m


TOK = data.make_tokenizer()
PROMPTS = [p for p, _ in data.task_examples("topic", 6, seed=0)] + [p for p, _ in data.task_examples("arith", 5, 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    base = _model(0)
    patch = _patch(base)
    evolved = _model(0)
    with torch.no_grad():  # θ′: θ moved by 10% of each weight's norm
        g = torch.Generator().manual_seed(5)
        for p in evolved.parameters():
            p += 0.1 * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g)
    pdir = root / "patch"
    patch.save(str(pdir))
    return base, evolved, patch, _save(base, root / "base"), _save(evolved, root / "evolved"), str(pdir), root


def _direct_lp(model, tok, prompts, targets):
    """(mean log p, mean p) per token of the targets, one prompt at a time, no padding."""
    lp = pr = n = 0
    with torch.no_grad():
        for p, t in zip(prompts, targets):
            ids = tok(p)["input_ids"]
            x = torch.tensor([ids + t])
            logp = torch.log_softmax(model(input_ids=x).logits.float()[0], -1)
            for k, tk in enumerate(t):
                lp += float(logp[len(ids) - 1 + k, tk])
                pr += float(logp[len(ids) - 1 + k, tk].exp())
                n += 1
    return lp / n, pr / n


def test_figures_equal_a_direct_computation_on_merged_models(models):
    base, evolved, patch, bdir, edir, _, _ = models
    rep = check.check_portability(bdir, edir, patch, PROMPTS, max_new_tokens=4, batch=4)
    tok = data.make_tokenizer()
    pb = _merged(base, patch)
    targets = []
    with torch.no_grad():  # θ+Δ's greedy answers, unbatched
        for p in PROMPTS:
            ids = tok(p)["input_ids"]
            for _ in range(4):
                ids = ids + [int(pb(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]
            targets.append(ids[-4:])
    want = {"base": _direct_lp(base, tok, PROMPTS, targets), "base+patch": _direct_lp(pb, tok, PROMPTS, targets),
            "evolved": _direct_lp(evolved, tok, PROMPTS, targets),
            "evolved+patch": _direct_lp(_merged(evolved, patch), tok, PROMPTS, targets)}
    for k, (lp, pr) in want.items():
        assert rep.logprob[k] == pytest.approx(lp, abs=2e-4), k
        assert rep.probability[k] == pytest.approx(pr, abs=2e-5), k
    assert rep.tokens == 4 * len(PROMPTS) and rep.agreement["base+patch"] == 1.0
    P = {k: v[1] for k, v in want.items()}
    g, g2 = P["base+patch"] - P["base"], P["evolved+patch"] - P["evolved"]
    assert g > 0.05 and rep.score == pytest.approx(g2 / g, rel=1e-3)
    assert rep.harm == (g2 < 0)
    assert {m.name for m in rep.modules} == set(patch.modules)
    for m in rep.modules:
        assert 0 < m.effect_base and 0 < m.effect_evolved and m.ratio > 0


def test_own_base_scores_one_and_a_release_holding_the_patch_is_harmed(models):
    base, _, patch, _, _, _, _ = models
    same = check.check_portability(base, copy.deepcopy(base), patch, PROMPTS, tokenizer=TOK)
    assert same.score == pytest.approx(1.0, abs=1e-6) and not same.harm
    assert all(m.ratio == pytest.approx(1.0, rel=1e-5) for m in same.modules)
    held = check.check_portability(base, _merged(base, patch), patch, PROMPTS, tokenizer=TOK)  # the vendor shipped θ+Δ
    assert held.harm and held.score < 0
    assert any("predicted harm: with the patch" in ln for ln in held.lines())


def test_a_patch_that_does_nothing_has_no_score(models):
    base, evolved, patch, _, _, _, _ = models
    tiny = Patch({n: PatchModule(m.B, m.A, m.scale * 1e-9) for n, m in patch.items()})
    rep = check.check_portability(base, evolved, tiny, PROMPTS, tokenizer=TOK)
    assert rep.score is None and not rep.harm and "not measurable" in rep.lines()[0]


@pytest.mark.parametrize("content,msg", [
    (b"", r"prompts file .*p\.txt: no prompts \(empty\)"),
    (b"\n  \n", r"no prompts \(empty\)"),
    (b"abc\0def", r"not a text file"),
    (b"\xff\xfe bad", r"not UTF-8 text"),
    (b'{"prompt": "<bos> a"}\n{"answer": "x"}\n', r"line 2: no \"prompt\" string"),
])
def test_bad_prompts_files_are_named(models, tmp_path, content, msg):
    base, evolved, patch, _, _, _, _ = models
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(check.PromptsError, match=msg) as e:
        check.check_portability(base, evolved, patch, str(f), tokenizer=TOK)
    assert "\n" not in str(e.value)


def test_prompts_read_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "one two", "answer": "x"}\n{"prompt": "three"}\n')
    assert check.read_prompts(str(tmp_path / "a.txt")) == ["one two", "three"]
    assert check.read_prompts(str(tmp_path / "b.jsonl")) == ["one two", "three"]
    with pytest.raises(check.PromptsError, match="missing"):
        check.read_prompts(str(tmp_path / "missing.txt"))


def test_a_patch_that_does_not_fit_is_named(models):
    base, evolved, patch, _, _, _, _ = models
    bad = Patch({"model.layers.0.mlp.down_proj": PatchModule(torch.randn(64, 2), torch.randn(2, 96), 1.0)})
    with pytest.raises(ValueError, match=r"module model\.layers\.0\.mlp\.down_proj: the patch's update is 64x96"):
        check.check_portability(base, evolved, bad, PROMPTS, tokenizer=TOK)
    with pytest.raises(ValueError, match=r"module model\.norm: the check applies a patch to Linear modules"):
        check.check_portability(base, evolved, Patch({"model.norm": PatchModule(torch.randn(64, 1),
                                                                               torch.randn(1, 64), 1.0)}), PROMPTS,
                                tokenizer=TOK)


def test_cli_check_and_port_check(models, tmp_path, capsys):
    from portllm.cli import main

    base, _, patch, bdir, edir, pdir, root = models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    assert main(["check", "--base", bdir, "--model", edir, "--patch", pdir, "--prompts", str(prompts), "--json",
                 str(tmp_path / "r.json")]) == 0
    assert "portability score" in capsys.readouterr().out
    assert "meaning" in json.loads((tmp_path / "r.json").read_text())
    held = _save(_merged(base, patch), root / "held")  # a release that already holds the patch
    out = tmp_path / "out"
    assert main(["check", "--base", bdir, "--model", held, "--patch", pdir, "--prompts", str(prompts)]) == 3
    capsys.readouterr()
    assert main(["port", "--model", held, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts)]) != 0
    err = capsys.readouterr()
    assert "predicted harm" in err.out + err.err and not out.exists()
    assert main(["port", "--model", held, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts), "--force"]) != 0  # --force replaces an output; it does not overrule the check
    assert not out.exists()
    assert main(["port", "--model", held, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts), "--ignore-harm"]) == 0
    assert os.path.isfile(out / "model.safetensors")
    capsys.readouterr()
    # what the port refuses (a non-empty --out without --force) is refused before the check runs
    assert main(["port", "--model", held, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts), "--ignore-harm"]) != 0
    err = capsys.readouterr()
    assert "not empty" in err.err and "check:" not in err.out
    # a report written into an input: refused before the work
    assert main(["check", "--base", bdir, "--model", edir, "--patch", pdir, "--prompts", str(prompts), "--json",
                 os.path.join(edir, "r.json")]) != 0
    assert not os.path.exists(os.path.join(edir, "r.json")) and "portability" not in capsys.readouterr().out
    assert portllm.check_portability is check.check_portability


@pytest.mark.parametrize("held,want", [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)])
def test_calibration_finds_the_scale_the_release_is_missing(models, held, want):
    """θ′ = θ + held·Δ: θ′ + s·Δ equals θ+Δ at s = 1 − held, where the KL is zero."""
    base, _, patch, _, _, _, _ = models
    rep = check.check_portability(base, _merged(base, patch, held), patch, PROMPTS, tokenizer=TOK, calibrate=True)
    assert rep.scale == want and set(rep.calibration) == set(check.CALIBRATION_GRID)
    assert rep.calibration[want] == pytest.approx(0.0, abs=1e-5)
    assert all(v > 1e-4 for k, v in rep.calibration.items() if k != want)
    assert any(ln.startswith(f"calibration: θ′ + {want:g}·Δ agrees best") for ln in rep.lines())


def test_port_check_calibrate_ports_at_the_chosen_scale(models, tmp_path, capsys):
    from safetensors.torch import load_file

    from portllm.cli import main

    base, _, patch, bdir, _, pdir, root = models
    half = _save(_merged(base, patch, 0.5), root / "half")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    assert main(["port", "--model", half, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts), "--calibrate"]) == 0
    assert "porting at patch scale 0.5" in capsys.readouterr().out
    got = load_file(str(out / "model.safetensors"))
    want = load_file(os.path.join(half, "model.safetensors"))
    k = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(got[k + ".weight"].double(), want[k + ".weight"].double()
                               + 0.5 * patch[k].delta().double(), rtol=0, atol=1e-6)
    assert main(["port", "--model", half, "--patch", pdir, "--out", str(tmp_path / "o2"), "--calibrate"]) != 0
    assert "--calibrate needs --check" in capsys.readouterr().err


def test_port_check_judges_the_scale_it_ports_at(models, tmp_path, capsys):
    """--scale with --check: the check judges θ′ + scale·Δ, the model the port writes. On θ′ = θ + Δ/2 at
    scale 1/2, θ′ + Δ/2 is θ+Δ itself."""
    from safetensors.torch import load_file

    from portllm.cli import main

    base, _, patch, bdir, _, pdir, root = models
    half = _save(_merged(base, patch, 0.5), root / "half2")
    rep = check.check_portability(bdir, half, pdir, PROMPTS, scale=0.5)
    assert rep.patch_scale == 0.5 and rep.logprob["evolved+patch"] == pytest.approx(rep.logprob["base+patch"], abs=1e-5)
    assert "the patch at scale 0.5 keeps" in rep.lines()[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    assert main(["port", "--model", half, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                 str(prompts), "--scale", "0.5"]) == 0
    assert "at scale 0.5" in capsys.readouterr().out
    k = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(load_file(str(out / "model.safetensors"))[k].double(),
                               load_file(os.path.join(half, "model.safetensors"))[k].double()
                               + 0.5 * patch[k.removesuffix(".weight")].delta().double(), rtol=0, atol=1e-6)
    assert main(["port", "--model", half, "--patch", pdir, "--out", str(tmp_path / "o3"), "--base", bdir,
                 "--check", str(prompts), "--scale", "0.5", "--calibrate"]) != 0
    assert "leave out --scale" in capsys.readouterr().err


def test_hooks_removed_and_modes_restored_on_error(models):
    """A forward that fails half-way leaves the caller's model as it was: no hooks, its training mode."""
    base, evolved, patch, *_ = models
    m = copy.deepcopy(evolved).train()

    def boom(mod, args, out):
        raise RuntimeError("boom")

    h = m.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        check.check_portability(base, m, patch, PROMPTS, tokenizer=TOK)
    h.remove()
    assert m.training and all(x.training for x in m.modules())
    assert not any(x._forward_hooks for x in m.modules())
    ok = check.check_portability(base, m, patch, PROMPTS, tokenizer=TOK)
    assert m.training and ok.score is not None


def test_a_loaded_model_elsewhere_is_refused_not_moved(models):
    base, evolved, patch, *_ = models
    with pytest.raises(ValueError, match="on cpu, the check runs on meta"):
        check.check_portability(base, evolved, patch, PROMPTS, tokenizer=TOK, device="meta")


def test_a_module_that_flattens_its_input(tmp_path):
    """Qwen2-MoE's shared expert sees the tokens flattened to [b·L, hidden]: the hooks mask its padded rows
    as they do [b, L, hidden] inputs; the routed experts' own weights are 3-D and not the check's."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(vocab_size=len(data.VOCAB), hidden_size=64, intermediate_size=64,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    base = transformers.Qwen2MoeForCausalLM(cfg).eval()
    mods = dict(base.named_modules())
    names = [n for n in mods if n.endswith("shared_expert.down_proj") or n.endswith("self_attn.q_proj")]
    g = torch.Generator().manual_seed(2)
    patch = Patch({n: PatchModule(torch.randn(mods[n].weight.shape[0], 4, generator=g),
                                  torch.randn(4, mods[n].weight.shape[1], generator=g), 0.05) for n in names})
    evolved = _merged(base, patch, 0.5)
    rep = check.check_portability(base, evolved, patch, PROMPTS, tokenizer=TOK, batch=4)
    assert {m.name for m in rep.modules} == set(names)
    assert all(0 < m.effect_base < float("inf") for m in rep.modules)
    one = check.check_portability(base, evolved, patch, PROMPTS, tokenizer=TOK, batch=1)  # no padding at all
    for a, b in zip(rep.modules, one.modules):
        assert a.effect_base == pytest.approx(b.effect_base, rel=1e-4), a.name


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_quantized_release_is_checked_dequantized(models, tmp_path, fmt):
    """A quantized θ′ (NVFP4 compressed-tensors, block FP8) is loaded dequantized by transformers: the
    figures equal those on the same weights dequantized by portllm."""
    from portllm.experiment import fp4_release, fp8_release

    base, _, patch, bdir, edir, pdir, _ = models
    q = str(tmp_path / fmt)
    (fp4_release.save_nvfp4 if fmt == "nvfp4" else fp8_release.save_fp8)(edir, q)
    loaded = (fp4_release if fmt == "nvfp4" else fp8_release).load_dequantized(q)
    if fmt == "nvfp4":  # compressed-tensors decompresses to fp32 and casts to bf16: so do the figures here
        with torch.no_grad():
            for n, w in loaded.named_parameters():
                if n.endswith("_proj.weight"):
                    w.copy_(w.bfloat16().float())
    got = check.check_portability(bdir, q, pdir, PROMPTS)
    want = check.check_portability(bdir, loaded, pdir, PROMPTS, tokenizer=TOK)
    for k in want.logprob:
        assert got.logprob[k] == pytest.approx(want.logprob[k], rel=1e-4, abs=1e-5), k


def test_one_model_in_memory_at_a_time(models, monkeypatch):
    """θ, loaded from its directory, is freed before θ′ is loaded (nothing of the check holds it)."""
    import weakref

    _, _, patch, bdir, edir, _, _ = models
    real, seen, alive = check._load, [], []

    def load(src, device, dtype):
        alive.append([r() is not None for r in seen])
        m = real(src, device, dtype)
        seen.append(weakref.ref(m))
        return m

    monkeypatch.setattr(check, "_load", load)
    check.check_portability(bdir, edir, patch, PROMPTS, calibrate=True)
    assert alive == [[], [False]]


def test_port_calibrate_refuses_harm_at_the_calibrated_scale(models, tmp_path, capsys, monkeypatch):
    """Calibration picks the scale that agrees best with θ+Δ, which need not help: where θ′ + s·Δ still
    gives θ+Δ's answers less often than θ′ alone, `port --calibrate` refuses like the uncalibrated check
    (nothing written), unless --ignore-harm; s = 0 (θ′ unchanged) is never harm."""
    from portllm.cli import main

    base, _, patch, bdir, edir, pdir, root = models
    real = check.check_portability(bdir, edir, pdir, PROMPTS, calibrate=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    for scale, gain, refused in ((0.75, -0.01, True), (0.75, 0.02, False), (0.0, -0.01, False)):
        rep = dataclasses.replace(real, scale=scale, calibrated_gain=gain)
        assert rep.calibrated_harm == refused
        monkeypatch.setattr(check, "check_portability", lambda *a, _rep=rep, **k: _rep)
        out = tmp_path / f"out-{scale}-{gain}"
        rc = main(["port", "--model", edir, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                   str(prompts), "--calibrate"])
        text = capsys.readouterr()
        if refused:
            assert rc != 0 and not out.exists() and "even at the calibrated scale 0.75" in text.err
            assert any(ln.startswith("predicted harm at scale 0.75 too") for ln in rep.lines())
            assert main(["port", "--model", edir, "--patch", pdir, "--out", str(out), "--base", bdir, "--check",
                         str(prompts), "--calibrate", "--ignore-harm"]) == 0
            assert os.path.isfile(out / "model.safetensors")
        else:
            assert rc == 0 and os.path.isfile(out / "model.safetensors")


def test_answers_end_at_the_end_of_sequence_token(models):
    """θ+Δ's greedy answers stop at its first end-of-sequence token: what a model generates past its end
    is not an answer, and is not scored. With every token an EOS, each answer is one token."""
    base, evolved, patch, _, _, _, _ = models
    full = check.check_portability(base, evolved, patch, PROMPTS, tokenizer=TOK, max_new_tokens=4)
    assert full.tokens == 4 * len(PROMPTS)
    every = list(range(base.config.vocab_size))
    saved = [(m, m.config.eos_token_id, m.generation_config.eos_token_id) for m in (base, evolved)]
    try:
        for m, _, _ in saved:
            m.config.eos_token_id = m.generation_config.eos_token_id = every
        short = check.check_portability(base, evolved, patch, PROMPTS, tokenizer=TOK, max_new_tokens=4)
    finally:
        for m, c, g in saved:
            m.config.eos_token_id, m.generation_config.eos_token_id = c, g
    assert short.tokens == len(PROMPTS)
