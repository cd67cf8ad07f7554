"""Writes stay inside the directory the library owns; an input is never replaced, entered or
deleted. Each case builds its own files, runs the command, and checks the exit status, the one-line
message, that every input hashes the same, and that nothing beside the output changed."""

import json
import os

import pytest
import torch
from safety_fixtures import make_checkpoint, make_patch, snapshot

from portllm import cli


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def world(tmp_path):
    """tmp/models/base (checkpoint), tmp/patch (adapter), tmp/neighbour (an unrelated directory)."""
    model = tmp_path / "models" / "base"
    make_checkpoint(model)
    patch = tmp_path / "patch"
    make_patch().save(str(patch))
    neighbour = tmp_path / "models" / "neighbour"
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("mine")
    return tmp_path, str(model), str(patch)


def port(capsys, model, patch, out, *extra):
    return run_cli(capsys, "port", "--model", model, "--patch", patch, "--out", out, "--device", "cpu", "--quiet",
                   *extra)


@pytest.mark.parametrize("bad", ["/tmp/portllm-evil.safetensors", "../evil.safetensors", "sub/x.safetensors", "..", ""])
def test_shard_names_from_the_index_are_plain_file_names(world, capsys, bad):
    root, model, patch = world
    index = os.path.join(model, "model.safetensors.index.json")
    with open(index) as f:
        idx = json.load(f)
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = bad
    with open(index, "w") as f:
        json.dump(idx, f)
    before = snapshot(str(root))
    code, err = port(capsys, model, patch, str(root / "out"))
    assert code == 1 and "\n" not in err
    assert repr(bad) in err and "plain file name" in err
    assert snapshot(str(root)) == before, "nothing may be written anywhere"
    assert not os.path.exists("/tmp/portllm-evil.safetensors")


def test_out_is_the_models_parent_with_force(world, capsys):
    root, model, patch = world
    before = snapshot(str(root))
    code, err = port(capsys, model, patch, str(root / "models"), "--force")
    assert code == 1 and "contains the input --model" in err
    assert snapshot(str(root)) == before


def test_out_through_a_symlinked_parent_is_the_model(world, capsys):
    root, model, patch = world
    os.symlink(os.path.join(root, "models"), root / "alias")
    before = snapshot(str(root))
    code, err = port(capsys, model, patch, str(root / "alias" / "base"), "--force")
    assert code == 1 and "is the input --model" in err
    assert snapshot(str(root)) == before


def test_out_inside_the_model(world, capsys):
    root, model, patch = world
    before = snapshot(str(root))
    code, err = port(capsys, model, patch, os.path.join(model, "ported"))
    assert code == 1 and "lies inside the input --model" in err
    assert snapshot(str(root)) == before


def test_out_is_the_patch(world, capsys):
    root, model, patch = world
    before = snapshot(str(root))
    code, err = port(capsys, model, patch, patch, "--force")
    assert code == 1 and "is the input --patch" in err
    assert snapshot(str(root)) == before


def test_extract_never_replaces_its_inputs(world, capsys, tmp_path):
    root, model, patch = world
    ft = str(root / "models" / "ft")
    make_checkpoint(ft, seed=0)
    t = make_checkpoint(str(root / "scratch"), seed=0)  # same weights as base; perturb one in ft
    from portllm.safetensors_io import SafetensorsReader  # noqa: F401
    before = snapshot(str(root))
    for out in (model, ft, str(root / "models")):
        code, err = run_cli(capsys, "extract", "--base", model, "--finetuned", ft, "--rank", "2", "--out", out,
                            "--force", "--device", "cpu")
        assert code == 1 and ("is the input" in err or "contains the input" in err), err
    assert snapshot(str(root)) == before
    assert t  # (fixture used)


def test_a_good_port_writes_only_its_output(world, capsys):
    root, model, patch = world
    out = root / "ported"
    before = snapshot(str(root / "models"), patch)
    code, err = port(capsys, model, patch, str(out))
    assert code == 0, err
    assert snapshot(str(root / "models"), patch) == before
    assert sorted(os.listdir(root)) == ["models", "patch", "ported"], "no temporary or lock files left beside"
    mode = os.stat(out).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask, oct(mode)


def test_links_out_of_the_model_are_not_followed(world, capsys):
    root, model, patch = world
    secret = root / "secret.txt"
    secret.write_text("not part of the model")
    os.symlink(secret, os.path.join(model, "tokenizer.json"))
    out = root / "ported"
    code, err = port(capsys, model, patch, str(out))
    assert code == 0, err
    assert not os.path.exists(out / "tokenizer.json")
    assert secret.read_text() == "not part of the model"


def test_force_replaces_only_the_output(world, capsys):
    root, model, patch = world
    out = root / "ported"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = snapshot(str(root / "models"), patch)
    code, _ = port(capsys, model, patch, str(out))
    assert code == 1
    assert (out / "old.txt").exists()
    code, err = port(capsys, model, patch, str(out), "--force")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert snapshot(str(root / "models"), patch) == before


def test_patch_save_refuses_its_input(tmp_path):
    from portllm.atomic import UnsafePathError

    model = tmp_path / "m"
    make_checkpoint(model)
    with pytest.raises(UnsafePathError, match="lies inside the input"):
        make_patch().save(str(model / "p"), inputs={"--base": str(model)})
    assert torch.equal(torch.ones(1), torch.ones(1))
