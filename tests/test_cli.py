"""The `portllm` command line: info, and errors as one line."""

from portllm import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backends on cpu:" in capsys.readouterr().out


def test_demo_user_mode_needs_all_four(capsys, tmp_path):
    assert cli.main(["demo", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "portllm demo: error: --base, --evolved, --patch and --tasks go together (your own checkpoints)"
