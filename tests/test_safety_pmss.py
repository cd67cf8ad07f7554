"""PMSS files attach only to the weights their skeleton was selected from, and PMSSLinear is a
drop-in for code that reads nn.Linear's attributes."""

import pytest
import torch

from portllm import pmss


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.ReLU(), torch.nn.Linear(40, 48))


def test_load_refuses_weights_changed_anywhere(tmp_path):
    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    with torch.no_grad():
        model[0].U.normal_()
    path = str(tmp_path / "p.safetensors")
    pmss.save(model, path)
    fresh = small_model()
    pmss.load(fresh, path)  # the same weights: accepted
    # One element changed where no 64-element sample looks: refused.
    other = small_model()
    with torch.no_grad():
        flat = other[0].weight.view(-1)
        flat[7] = flat[7] + 1e-3
    with pytest.raises(pmss.PMSSLoadError, match="not the ones this PMSS skeleton was selected from"):
        pmss.load(other, path)


def test_pmss_linear_exposes_linear_attributes():
    base = torch.nn.Linear(48, 40)
    weight, bias = base.weight, base.bias
    layer = pmss.PMSSLinear(base, torch.arange(4), torch.arange(4))
    assert (layer.in_features, layer.out_features) == (48, 40)
    assert layer.weight is weight and layer.bias is bias  # the same Parameters, never copies
    assert base.weight is weight and layer.restored_base() is base and base.weight is weight


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"a model's weights")
    with pytest.raises(FileExistsError, match="model.safetensors exists .*overwrite=True"):
        pmss.save(model, str(target))
    assert target.read_bytes() == b"a model's weights"
    pmss.save(model, str(target), overwrite=True)
    assert pmss.load(small_model(), str(target)) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_save_to_a_directory_is_refused_and_leaves_nothing(tmp_path):
    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    with pytest.raises(IsADirectoryError, match="is a directory: pmss.save writes one file"):
        pmss.save(model, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temporary(tmp_path, monkeypatch):
    from portllm import safetensors_io

    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    real = safetensors_io.SafetensorsWriter.write

    def fail_late(self, name, t):
        if self._next == 3:
            raise OSError(28, "No space left on device")
        return real(self, name, t)

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", fail_late)
    with pytest.raises(OSError, match="No space left"):
        pmss.save(model, str(tmp_path / "p.safetensors"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", ["nan-scale", "inf-U", "nan-U"])
def test_load_refuses_non_finite_values(tmp_path, bad):
    import json

    from portllm.safetensors_io import SafetensorsReader, write_tensors

    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    path = str(tmp_path / "p.safetensors")
    pmss.save(model, path)
    with SafetensorsReader(path) as rd:
        tensors = {k: rd[k].clone() for k in rd.keys()}
        meta = dict(rd.metadata)
    if bad == "nan-scale":
        info = json.loads(meta["portllm_pmss"])
        info["modules"]["2"]["scale"] = float("nan")
        meta["portllm_pmss"] = json.dumps(info)
    else:
        tensors["2.U"][1, 2] = float("inf") if bad == "inf-U" else float("nan")
    write_tensors(path, tensors, meta)
    fresh = small_model()
    with pytest.raises(pmss.PMSSLoadError, match="module 2: (scale nan is not a finite|U holds NaN or Inf)"):
        pmss.load(fresh, path)
    assert not pmss.pmss_modules(fresh), "nothing attached"


def test_merge_is_all_or_nothing():
    """A late module whose merge would overflow fp16 is refused before any weight is written."""
    model = pmss.inject(small_model().half(), rank=4, target_modules=["0", "2"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].U.fill_(0.01)
        model[2].U.fill_(1e8)  # |ΔW| far beyond 65504 in the second module
    with pytest.raises(ValueError, match="module 2: the merge would make"):
        pmss.merge(model)
    assert isinstance(model[0], pmss.PMSSLinear) and isinstance(model[2], pmss.PMSSLinear)
    for n, p in model.named_parameters():
        if not n.endswith(".U"):
            assert torch.equal(p, before[n]), f"{n} changed"


def test_float64_model_keeps_u_in_float64_and_passes_gradcheck():
    base = torch.nn.Linear(9, 7).double()
    layer = pmss.PMSSLinear(base, torch.tensor([0, 3, 5]), torch.tensor([1, 2, 8]), scale=0.7)
    assert layer.U.dtype == torch.float64
    with torch.no_grad():
        layer.U.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, U: pmss.pmss_linear(x, layer.weight, layer.bias, layer.I, layer.J, U,
                                                                  0.7, None), (x, layer.U))
    # fp16/bf16/fp32 models keep U in fp32.
    assert pmss.PMSSLinear(torch.nn.Linear(9, 7).half(), torch.arange(3), torch.arange(3)).U.dtype == torch.float32


def test_merge_after_the_weight_was_replaced_uses_the_current_weight():
    """A wrapper that replaces the layer's weight Parameter (load_state_dict(assign=True), FSDP2,
    offload hooks): merge writes into, and gives back, the current weight."""
    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"])
    with torch.no_grad():
        model[0].U.normal_(generator=torch.Generator().manual_seed(0))
    state = {k: (v.clone() + 1.0 if k == "0.weight" else v.clone()) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    expected = model[0].weight.detach().float() + model[0].delta()
    pmss.merge(model)
    assert isinstance(model[0], torch.nn.Linear)
    torch.testing.assert_close(model[0].weight.float(), expected, atol=1e-5, rtol=1e-5)


def test_half_keeps_u_and_the_scale_exact():
    model = pmss.inject(small_model(), rank=4, target_modules=["0", "2"], scale=0.1234567)
    with torch.no_grad():
        model[0].U.normal_(generator=torch.Generator().manual_seed(0))
    u = model[0].U.detach().clone()
    model.half()
    assert model[0].U.dtype == torch.float32 and torch.equal(model[0].U.detach(), u)
    assert model[0].scale == 0.1234567 and float(model[0].s) == 0.1234567
