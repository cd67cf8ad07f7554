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
    layer = pmss.PMSSLinear(base, torch.arange(4), torch.arange(4))
    assert (layer.in_features, layer.out_features) == (48, 40)
    assert layer.weight is base.weight and layer.bias is base.bias
