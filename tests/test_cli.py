"""The `portllm` command line: the demo runs and checks itself; errors are one line."""

import pytest

from portllm import cli


def test_demo_small(capsys):
    pytest.importorskip("transformers")
    assert cli.main(["demo", "--hidden", "128", "--layers", "1", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "merged 7 modules" in out and "ulp of W + " in out


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backends on cpu:" in capsys.readouterr().out


def test_bad_backend_is_one_line(capsys):
    pytest.importorskip("transformers")
    assert cli.main(["demo", "--hidden", "128", "--layers", "1", "--backend", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("portllm demo: error: unknown backend 'nope'") and "\n" not in err
