"""The compatibility report knows the base of a PEFT adapter: from --base / base=, or from the
adapter's base_model_name_or_path where that is a local checkpoint; without either it says what it
cannot know."""

import os

import pytest
import torch
from safety_fixtures import make_checkpoint, make_patch

from portllm import cli
from portllm.safetensors_io import SafetensorsReader, write_tensors


@pytest.fixture
def world(tmp_path):
    base, evolved = tmp_path / "base", tmp_path / "evolved"
    make_checkpoint(base)
    make_checkpoint(evolved)
    g = torch.Generator().manual_seed(9)
    for f in os.listdir(evolved):  # evolved = base moved by 5% of each weight's norm
        if f.endswith(".safetensors"):
            with SafetensorsReader(str(evolved / f)) as rd:
                ts = {k: rd[k].float() for k in rd.keys()}
            for k, t in ts.items():
                noise = torch.randn(t.shape, generator=g)
                ts[k] = (t + noise * (0.05 * t.norm() / noise.norm())).to(torch.bfloat16)
            write_tensors(str(evolved / f), ts, {"format": "pt"})
    return tmp_path, str(base), str(evolved)


def report(capsys, model, patch, out, *extra):
    code = cli.main(["port", "--model", model, "--patch", patch, "--out", str(out), "--device", "cpu", *extra])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return [ln for ln in cap.out.splitlines() if "base:" in ln][0]


def test_without_a_base_the_report_says_what_it_cannot_know(world, capsys):
    root, base, evolved = world
    make_patch().save(str(root / "p"))
    line = report(capsys, evolved, str(root / "p"), root / "o")
    assert "base: unknown" in line and "'test', is not a local checkpoint directory" in line and "--base DIR" in line


def test_base_given_measures_the_drift(world, capsys):
    root, base, evolved = world
    make_patch().save(str(root / "p"))
    line = report(capsys, evolved, str(root / "p"), root / "o", "--base", base)
    assert "another model (evolved)" in line and f"measured against the base at {base}" in line
    moved = float(line.split("moved by ")[1].split("%")[0])
    assert 2.0 < moved < 10.0, line  # 5% of each weight's norm, estimated from 64 samples
    line = report(capsys, base, str(root / "p"), root / "o2", "--base", base)
    assert "this model is the patch's own base" in line


def test_a_local_base_model_name_or_path_is_used(world, capsys):
    root, base, evolved = world
    p = make_patch()
    p.base_model = base
    p.save(str(root / "p"))
    line = report(capsys, evolved, str(root / "p"), root / "o")
    assert "another model (evolved)" in line and base in line


def test_out_may_not_be_the_base(world, capsys):
    root, base, evolved = world
    make_patch().save(str(root / "p"))
    code = cli.main(["port", "--model", evolved, "--patch", str(root / "p"), "--out", base, "--force", "--base", base,
                     "--device", "cpu", "--quiet"])
    assert code == 1 and "is the input --base" in capsys.readouterr().err


def test_the_drift_is_not_offered_as_a_forecast(world, capsys):
    """Weights alone do not predict whether a port helps: the report says so beside the drift it measures."""
    root, base, evolved = world
    make_patch().save(str(root / "p"))
    for model, out, says in ((evolved, "o3", True), (base, "o4", False)):
        code = cli.main(["port", "--model", model, "--patch", str(root / "p"), "--out", str(root / out),
                         "--device", "cpu", "--base", base])
        text = capsys.readouterr().out
        assert code == 0 and ("does not tell whether the patch still helps" in text) == says, text
