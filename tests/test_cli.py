"""The `portllm` command line: info, and errors as one line."""

from portllm import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backends on cpu:" in capsys.readouterr().out


def test_demo_user_mode_needs_all_four(capsys, tmp_path):
    assert cli.main(["demo", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "portllm demo: error: --base, --evolved, --patch and --tasks go together (your own checkpoints)"


def test_version(capsys):
    import pytest

    from portllm import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"portllm {__version__}"


def test_every_command_has_a_description_and_an_example(capsys):
    import pytest

    for command in ("demo", "info", "port", "extract", "inspect"):
        with pytest.raises(SystemExit):
            cli.main([command, "-h"])
        out = capsys.readouterr().out
        assert "example:\n  portllm " + command in out, (command, out)


def _patch_dir(tmp_path, n_layers):
    from safety_fixtures import make_patch

    modules = [f"model.layers.{i}.{p}" for i in range(n_layers) for p in ("self_attn.q_proj", "mlp.down_proj")]
    return make_patch(modules=modules).save(str(tmp_path / f"p{n_layers}"))


def test_inspect_summarises_above_50_modules(tmp_path, capsys):
    small, big = _patch_dir(tmp_path, 2), _patch_dir(tmp_path, 30)
    assert cli.main(["inspect", small]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "summary by kind" not in out
    assert cli.main(["inspect", big]) == 0
    out = capsys.readouterr().out
    assert "summary by kind" in out and "model.layers.29" not in out
    assert [ln.split()[:2] for ln in out.splitlines() if ln.strip().startswith(("q_proj", "down_proj"))] == \
        [["q_proj", "30"], ["down_proj", "30"]]
    assert cli.main(["inspect", big, "--full"]) == 0
    assert "model.layers.29.mlp.down_proj" in capsys.readouterr().out
    assert cli.main(["inspect", small, "--summary"]) == 0
    assert "summary by kind" in capsys.readouterr().out


def test_a_closed_pipe_ends_quietly(tmp_path):
    import subprocess
    import sys

    big = _patch_dir(tmp_path, 2000)  # 4000 lines: more than a pipe holds
    inspect = subprocess.Popen([sys.executable, "-c", "import sys; from portllm import cli; "
                                f"sys.exit(cli.main(['inspect', {big!r}, '--full']))"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    inspect.stdout.readline()
    inspect.stdout.close()  # what `| head -1` does
    err = inspect.stderr.read().decode()
    assert inspect.wait(timeout=60) == 141 and err == "", err


def test_reprs_are_short():
    import torch

    import portllm
    from safety_fixtures import make_patch

    patch = make_patch()
    assert len(repr(patch)) < 200 and repr(patch).startswith("Patch(4 modules, ranks [4]")
    assert repr(patch["model.layers.0.self_attn.q_proj"]) == "PatchModule(weight 24x40, rank 4, scale 0.5, float32)"
    net = torch.nn.Module()
    net.model = torch.nn.Module()
    net.model.layers = torch.nn.ModuleList()
    for _ in range(2):
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
        layer.self_attn.q_proj = torch.nn.Linear(40, 24, bias=False)
        layer.mlp.down_proj = torch.nn.Linear(40, 24, bias=False)
        net.model.layers.append(layer)
    portllm.apply_patch(net, patch, exact=True)
    rec = portllm.exact_merges(net)[0]
    assert len(repr(rec)) < 200 and repr(rec).startswith("ExactMerge(1 patch(es), scales [1.0], 4 weights")


def test_demo_on_a_base_without_tokenizer_files_says_so(tmp_path, capsys):
    import json

    from safety_fixtures import make_checkpoint, make_patch

    make_checkpoint(tmp_path / "base")
    make_checkpoint(tmp_path / "evolved", seed=1)
    make_patch().save(str(tmp_path / "p"))
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"task": "t", "prompt": "a", "answer": "b"}) + "\n")
    code = cli.main(["demo", "--base", str(tmp_path / "base"), "--evolved", str(tmp_path / "evolved"), "--patch",
                     str(tmp_path / "p"), "--tasks", str(tmp_path / "tasks.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "no tokenizer files" in err and str(tmp_path / "base") in err and "\n" not in err, err
