"""PMSS on transformers models: selection, injection, training, save/load, merge, to_patch, errors."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import evolve, llama  # noqa: E402

import portllm  # noqa: E402
from portllm import pmss  # noqa: E402


@pytest.mark.parametrize("method", pmss.select.METHODS)
def test_select_valid_and_deterministic(method):
    W = torch.randn(3, 40, 70, generator=torch.Generator().manual_seed(0))
    I, J = pmss.select_skeleton(W, 12, method, seed=3)
    assert I.shape == J.shape == (3, 12) and I.dtype == torch.int64
    for b in range(3):
        assert I[b].unique().numel() == 12 and J[b].unique().numel() == 12
        assert int(I[b].max()) < 40 and int(J[b].max()) < 70 and int(I.min()) >= 0
        assert torch.equal(I[b], I[b].sort().values)
        # batched selection == one matrix at a time
        Ib, Jb = pmss.select_skeleton(W[b], 12, method, seed=3)
        assert torch.equal(Ib, I[b]) and torch.equal(Jb, J[b])
    I2, J2 = pmss.select_skeleton(W, 12, method, seed=3)
    assert torch.equal(I, I2) and torch.equal(J, J2)
    # r = min(m, n) selects every row
    assert torch.equal(pmss.select_skeleton(W[0], 40, method)[0], torch.arange(40))


def test_deim_picks_the_dominant_subspace():
    """On an exactly rank-r matrix, the skeleton C·U·R with U = W[I, J]⁻¹ reproduces W (CUR)."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(60, 5, generator=g) @ torch.randn(5, 50, generator=g)).double()
    for method in ("deim", "qdeim"):
        I, J = pmss.select_skeleton(W, 5, method)
        cur = W[:, J] @ torch.linalg.inv(W[I][:, J]) @ W[I, :]
        torch.testing.assert_close(cur, W, rtol=1e-4, atol=1e-5 * W.abs().max().item())


@pytest.mark.parametrize("b,m,r", [(1, 7, 7), (3, 50, 12), (2, 300, 64), (1, 2000, 40)])
def test_deim_equals_the_definition(b, m, r):
    """deim (the pivots of an LU factorisation with partial pivoting) and deim_incremental (one rank-1
    elimination per step) pick the indices of deim_lstsq (growing solves), in order."""
    from portllm.pmss.select import deim, deim_incremental, deim_lstsq

    g = torch.Generator().manual_seed(m + r)
    U = torch.linalg.qr(torch.randn(b, m, r, generator=g, dtype=torch.float64)).Q.float()
    want = deim_lstsq(U)
    assert torch.equal(deim(U), want) and torch.equal(deim_incremental(U), want)
    # singular vectors of a real weight, as inject sees them
    W = torch.randn(b, m, max(r, m // 2), generator=g)
    Uw = torch.linalg.svd(W, full_matrices=False).U[..., :r]
    want = deim_lstsq(Uw)
    assert torch.equal(deim(Uw), want) and torch.equal(deim_incremental(Uw), want)
    # the batch is not mixed up: each matrix's indices are its own
    assert torch.equal(deim(Uw[-1:]), want[-1:])


def test_select_errors():
    with pytest.raises(ValueError, match=r"rank r=41 must be in 1..min\(m, n\)=40"):
        pmss.select_skeleton(torch.randn(40, 70), 41)
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        pmss.select_skeleton(torch.randn(40, 70), 4, "svd")
    with pytest.raises(TypeError, match="I must be a 1-D int64 tensor"):
        pmss.PMSSLinear(torch.nn.Linear(5, 6), torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="J has repeated indices"):
        pmss.PMSSLinear(torch.nn.Linear(5, 6), torch.tensor([0, 1]), torch.tensor([1, 1]))


def test_inject_freezes_all_but_U():
    model = pmss.inject(llama(seed=0), rank=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 14 and all(n.endswith(".U") for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 14 * 64
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, llama(seed=0)(tokens).logits)  # U = 0: unchanged
    with pytest.raises(ValueError, match="no nn.Linear modules named c_attn"):
        pmss.inject(llama(seed=0), rank=4, target_modules=["c_attn"])


def _train(model, steps=15, lr=5e-2, seed=0):
    torch.manual_seed(seed)
    tokens = torch.randint(0, 128, (4, 16))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained():
    # A random init's weights are ~0.02, so C·U·R is small: a larger scale gives U's steps effect.
    model = pmss.inject(llama(seed=0), rank=8, scale=30.0)
    model.train()
    losses = _train(model)
    return model, losses


def test_training_lowers_the_loss(trained):
    _, losses = trained
    assert losses[-1] < 0.93 * losses[0], losses


def test_merge_equals_unmerged_and_to_patch_ports(trained, tmp_path):
    model, _ = trained
    tokens = torch.randint(0, 128, (2, 12))
    model.eval()
    with torch.no_grad():
        expected = model(tokens).logits
    patch = pmss.to_patch(model)
    assert patch.source == "pmss" and len(patch) == 14 and patch.rank == 8
    merged = pmss.merge(copy.deepcopy(model))
    assert not pmss.pmss_modules(merged)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith("proj"))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, expected, rtol=1e-4, atol=1e-4)
    # the patch applied to the base model gives the same weights as merge
    base = portllm.apply_patch(llama(seed=0), patch)
    for (k, a), (_, b) in zip(base.state_dict().items(), merged.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert portllm.check_compatibility(llama(seed=0), patch).is_base is True
    # ... and ports onto an evolved model like a LoRA patch
    evolved_dir = str(tmp_path / "evolved")
    evolve(llama(seed=0)).save_pretrained(evolved_dir)
    res = portllm.port(evolved_dir, patch, str(tmp_path / "ported"), progress=False, log=None)
    assert res.merged == 14 and res.report.is_base is False


def test_save_load_round_trip(trained, tmp_path):
    model, _ = trained
    path = str(tmp_path / "pmss.safetensors")
    pmss.save(model, path)
    fresh = pmss.load(llama(seed=0), path)
    tokens = torch.randint(0, 128, (2, 12))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, model(tokens).logits)
    for name, m in pmss.pmss_modules(model).items():
        f = fresh.get_submodule(name)
        assert torch.equal(f.I, m.I) and torch.equal(f.J, m.J) and torch.equal(f.U, m.U)
    # loading onto other weights is refused, and the message points to to_patch
    with pytest.raises(pmss.PMSSLoadError, match="not the ones this PMSS skeleton was selected from.*to_patch"):
        pmss.load(evolve(llama(seed=0)), path)
    with pytest.raises(pmss.PMSSLoadError, match="no module"):
        pmss.load(llama(seed=0, layers=1), path)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 12))
    grads = []
    for ckpt in (False, True):
        model = pmss.inject(llama(seed=0), rank=4)
        with torch.no_grad():
            for m in pmss.pmss_modules(model).values():
                m.U.normal_(0, 0.1, generator=torch.Generator().manual_seed(7))
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


def test_torch_compile_same_as_eager():
    torch._dynamo.reset()
    lin = torch.nn.Linear(32, 24)
    I, J = pmss.select_skeleton(lin.weight, 6)
    layer = pmss.PMSSLinear(lin, I, J, scale=0.5)
    with torch.no_grad():
        layer.U.normal_()
    x = torch.randn(5, 32, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    gx, gU = x.grad.clone(), layer.U.grad.clone()
    x.grad = None
    layer.U.grad = None
    yc = torch.compile(layer, backend="aot_eager")(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(layer.U.grad, gU)


def test_hf_trainer(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model = pmss.inject(llama(seed=0), rank=4)
    torch.manual_seed(0)
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 128, (8, 16))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2,
                             save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(n.endswith(".U") for n in changed)


def test_layer_form_gemm_by_default_and_named_backends_run_the_op(monkeypatch):
    """The layer's default form gathers C and R for the BLAS GEMM and never calls skeleton_mm; a named
    backend ("reference" included) runs ops.skeleton_mm; both give the same outputs and gradients."""
    from portllm import ops
    from portllm.pmss.layer import PMSSLinear

    monkeypatch.delenv("PORTLLM_BACKEND", raising=False)
    calls = []
    real = ops.skeleton_mm
    monkeypatch.setattr(ops, "skeleton_mm", lambda *a, **kw: calls.append(kw.get("backend")) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(11, 7)
    U = torch.randn(3, 3, generator=g)
    out = {}
    for backend in (None, "gemm", "reference"):
        layer = PMSSLinear(base, torch.tensor([0, 3, 5]), torch.tensor([1, 2, 9]), 0.5, backend, U=U)
        x = torch.randn(4, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        out[backend] = (y.detach(), x.grad, layer.U.grad)
        assert (len(calls) > 0) == (backend == "reference"), (backend, calls)
    for a, b in zip(out[None], out["reference"]):
        torch.testing.assert_close(a, b)
    for a, b in zip(out[None], out["gemm"]):
        assert torch.equal(a, b)


def test_target_modules_follow_peft():
    """One rule for PMSS, serving and extraction, PEFT's: full names, dotted suffixes, or a regex string
    matched against the whole name (a string is not a list of characters)."""
    from portllm.targets import matches

    name = "model.layers.0.self_attn.q_proj"
    assert matches(name, ["q_proj"]) and matches(name, ["self_attn.q_proj"]) and matches(name, [name])
    assert not matches(name, ["proj"]) and not matches(name, ["attn.q_proj"]) and not matches(name, ["k_proj"])
    assert matches(name, r".*\.q_proj") and not matches(name, "q_proj") and not matches(name, r"layers\.0")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    from portllm.pmss.model import _targets

    assert _targets(model, r"\d") == ["0", "1"] and _targets(model, ["1"]) == ["1"]
