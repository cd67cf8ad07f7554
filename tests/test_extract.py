"""extract_patch: a low-rank patch from a full fine-tune, by truncated SVD of each ΔW."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import TARGETS, llama  # noqa: E402

import portllm  # noqa: E402
from portllm import cli  # noqa: E402
from portllm.patch import Patch  # noqa: E402


def finetune_low_rank(base, rank=3, seed=5):
    """A 'full fine-tune' whose every projection moved by an exact rank-`rank` update."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in ft.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = mod.weight.shape
                mod.weight += 0.05 * torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / in_f**0.5
    return ft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = llama(seed=0)
    ft = finetune_low_rank(base)
    base.save_pretrained(root / "base")
    ft.save_pretrained(root / "ft")
    return {"root": root, "base": base, "ft": ft}


def test_rank_recovers_exact_low_rank_update(models):
    patch = portllm.extract_patch(str(models["root"] / "base"), str(models["root"] / "ft"), rank=3, device="cpu")
    assert len(patch) == 14 and patch.rank == 3
    assert min(patch.extra["energy_kept"].values()) > 0.999999
    merged = portllm.apply_patch(copy.deepcopy(models["base"]), patch)
    for (k, a), (_, b) in zip(merged.state_dict().items(), models["ft"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_energy_picks_the_smallest_rank(models):
    patch = portllm.extract_patch(models["base"], models["ft"], energy=0.5, device="cpu")
    for name, m in patch.items():
        kept = patch.extra["energy_kept"][name]
        assert kept >= 0.5 and 1 <= m.rank <= 3
        if m.rank > 1:  # one rank less would not have been enough
            d = m.delta()
            U, S, Vh = torch.linalg.svd(m.B.double() @ m.A.double())
            assert kept - (S[m.rank - 1] ** 2 / (d.double().norm() ** 2 / kept)).item() < 0.5
    # the base's fingerprint travels with the patch
    rep = portllm.check_compatibility(models["base"], patch)
    assert rep.is_base is True
    assert portllm.check_compatibility(models["ft"], patch).is_base is False


def test_cli_extract_then_inspect(models, tmp_path, capsys):
    out = str(tmp_path / "patch")
    assert cli.main(["extract", "--base", str(models["root"] / "base"), "--finetuned", str(models["root"] / "ft"),
                     "--rank", "2", "--out", out, "--device", "cpu"]) == 0
    assert "14 modules, rank 2..2" in capsys.readouterr().out
    p = Patch.load(out)
    assert p.source == "extract" and p.base_fingerprint is not None
    assert cli.main(["inspect", out]) == 0


def test_errors(models):
    with pytest.raises(ValueError, match="exactly one of rank= or energy="):
        portllm.extract_patch(models["base"], models["ft"], rank=2, energy=0.9)
    with pytest.raises(ValueError, match="nothing to extract"):
        portllm.extract_patch(models["base"], copy.deepcopy(models["base"]), rank=2)
    with pytest.raises(ValueError, match="base .* but fine-tuned"):
        portllm.extract_patch(models["base"], llama(seed=0, hidden=96), rank=2)
