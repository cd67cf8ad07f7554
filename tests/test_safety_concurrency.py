"""Interrupted and concurrent writes: a lock per destination, stale temporaries cleaned, kill -9
mid-port leaves the previous output (or nothing) under the output's name, disk full leaves nothing."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safety_fixtures import make_checkpoint, make_patch, snapshot

from portllm import cli
from portllm.atomic import DestinationLockedError, staging_dir


@pytest.fixture
def world(tmp_path):
    model = tmp_path / "model"
    make_checkpoint(model, shape=(64, 96))
    patch = tmp_path / "patch"
    make_patch(shape=(64, 96)).save(str(patch))
    return tmp_path, str(model), str(patch)


def test_second_writer_of_one_destination_fails(tmp_path, capsys):
    dest = tmp_path / "out"
    with staging_dir(str(dest)) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
        with pytest.raises(DestinationLockedError, match="another portllm process is writing"):
            with staging_dir(str(dest)):
                pass
    assert os.listdir(dest) == ["a"]


def test_two_concurrent_ports_one_fails_with_a_message(world, capsys):
    root, model, patch = world
    out = root / "out"
    # Hold the destination's lock from another process for a moment, then port into it.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from portllm.atomic import staging_dir
        with staging_dir({str(out)!r}) as tmp:
            print("locked", flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli.main(["port", "--model", model, "--patch", patch, "--out", str(out), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "another portllm process is writing" in err and "\n" not in err
    finally:
        holder.kill()
        holder.wait()


def test_kill_9_mid_port_then_the_next_run_cleans_up(world, capsys):
    root, model, patch = world
    out = root / "out"
    before = snapshot(model, patch)
    # A port that stops (SIGSTOP-free: it sleeps inside the staging directory) and is killed -9.
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, portllm.port
        P = sys.modules["portllm.port"]
        real = P._copy_other_files
        def slow(*a, **k):
            real(*a, **k)
            print("writing", flush=True)
            time.sleep(60)
        P._copy_other_files = slow
        P.port({model!r}, {patch!r}, {str(out)!r}, device="cpu", progress=False, log=None)
    """)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed port leaves nothing under the output's name"
    stale = [e for e in os.listdir(root) if e.startswith(".out.portllm-tmp-")]
    assert len(stale) == 1
    code = cli.main(["port", "--model", model, "--patch", patch, "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "left unfinished by process" in captured.out
    assert sorted(os.listdir(root)) == ["model", "out", "patch"]
    assert snapshot(model, patch) == before


def test_an_exception_mid_write_leaves_the_previous_output(world, monkeypatch):
    root, model, patch = world
    out = root / "out"
    import importlib

    import portllm
    P = importlib.import_module("portllm.port")

    portllm.port(model, patch, str(out), device="cpu", progress=False, log=None)
    first = snapshot(str(out))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P, "_copy_other_files", boom)
    with pytest.raises(OSError, match="No space left"):
        portllm.port(model, patch, str(out), device="cpu", progress=False, log=None, force=True)
    assert snapshot(str(out)) == first
    assert sorted(os.listdir(root)) == ["model", "out", "patch"]


def _small_fs(path):
    """A 1 MiB tmpfs at path (root only); None if it cannot be mounted here."""
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    return path if res.returncode == 0 else None


def test_disk_full(world, capsys):
    root, model, patch = world
    make_checkpoint(os.path.join(root, "big"), shape=(512, 1024))
    make_patch(shape=(512, 1024)).save(str(root / "bigpatch"))
    fs = _small_fs(root / "small")
    if fs is None:
        pytest.skip("cannot mount a small file system here (needs root and tmpfs)")
    try:
        code = cli.main(["port", "--model", str(root / "big"), "--patch", str(root / "bigpatch"), "--out",
                         str(fs / "out"), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and "No space left on device" in err and "\n" not in err
        assert os.listdir(fs) == [], "nothing half-written is left"
    finally:
        subprocess.run(["umount", str(fs)])


def test_patch_save_is_atomic_and_locked(tmp_path):
    p = make_patch()
    dest = tmp_path / "p"
    p.save(str(dest))
    first = snapshot(str(dest))
    with pytest.raises(RuntimeError, match="abandon"):
        with staging_dir(str(dest)):
            with pytest.raises(DestinationLockedError):
                p.save(str(dest), overwrite=True)
            raise RuntimeError("abandon the outer write")
    assert snapshot(str(dest)) == first
    assert time.time() > 0
