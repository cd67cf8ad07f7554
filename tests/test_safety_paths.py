"""Second round of hostile paths and files: a directory reached by two names (bind mount), planted
lock files and stray portllm-like directories, FIFOs, devices and sockets, links below the model's
top level, inputs rewritten during a port, and casts that overflow. Each case checks the exit
status, the one-line message naming the file or tensor, that the inputs hash the same, and that
nothing beside the output changed. Cases that need root (bind mounts, device nodes) skip with the
reason where this machine cannot make them."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch
from safety_fixtures import make_checkpoint, make_patch, snapshot

from portllm import cli
from portllm.safetensors_io import write_tensors


@pytest.fixture
def world(tmp_path):
    model = tmp_path / "models" / "base"
    make_checkpoint(model)
    patch = tmp_path / "patch"
    make_patch().save(str(patch))
    return tmp_path, str(model), str(patch)


def port(capsys, model, patch, out, *extra):
    code = cli.main(["port", "--model", model, "--patch", patch, "--out", str(out), "--device", "cpu", "--quiet",
                     *extra])
    cap = capsys.readouterr()
    return code, cap.err.strip(), cap.out


def run_isolated(argv, timeout=60):
    """The CLI in a child process with a deadline: a case that would hang fails instead of hanging."""
    code = f"import sys; from portllm import cli; sys.exit(cli.main({argv!r}))"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"portllm {' '.join(argv[:1])} hung for {timeout} s")
    return res.returncode, res.stderr.strip()


# -- one directory, two names --------------------------------------------------------------------

def test_out_through_a_bind_mount_of_the_models_parent_is_refused(world, capsys):
    root, model, patch = world
    alias = root / "alias"
    alias.mkdir()
    res = subprocess.run(["mount", "--bind", str(root / "models"), str(alias)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs root): {res.stderr.strip()}")
    try:
        before = snapshot(model, patch)
        code, err, _ = port(capsys, model, patch, alias / "base", "--force")
        assert code == 1 and "is the input --model" in err and "\n" not in err, err
        code, err, _ = port(capsys, model, patch, alias, "--force")
        assert code == 1 and "contains the input --model" in err, err
        code, err, _ = port(capsys, model, patch, alias / "base" / "sub")
        assert code == 1 and "lies inside the input --model" in err, err
        assert snapshot(model, patch) == before
    finally:
        subprocess.run(["umount", str(alias)])


def test_out_is_a_hard_link_alias_of_the_patch_file(world, capsys):
    """Identity, not spelling: the adapter file reached through a hard link is still the input."""
    root, model, patch = world
    from portllm.atomic import UnsafePathError, check_disjoint

    link = root / "same.safetensors"
    os.link(os.path.join(patch, "adapter_model.safetensors"), link)
    with pytest.raises(UnsafePathError, match="is the input"):
        check_disjoint(str(link), {"--patch": os.path.join(patch, "adapter_model.safetensors")})


# -- what lies beside the output -----------------------------------------------------------------

def test_a_planted_lock_symlink_is_not_followed(world, capsys):
    root, model, patch = world
    target = root / "created-elsewhere"
    os.symlink(target, root / ".ported.portllm-lock")
    before = snapshot(model, patch)
    code, err, _ = port(capsys, model, patch, root / "ported")
    assert code == 1 and "lock file" in err and "symbolic link" in err and "\n" not in err, err
    assert not os.path.lexists(target) and not os.path.exists(root / "ported")
    assert snapshot(model, patch) == before


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("name", ["ported.portllm-old-{pid}", ".ported.portllm-old-{pid}-x1",
                                  ".ported.portllm-tmp-{pid}-x2"])
def test_a_stray_portllm_like_directory_is_never_adopted(world, capsys, name):
    """A directory named like portllm's own, left by a process that no longer runs, but not made
    by portllm (no owner mark): never renamed onto the output, never deleted."""
    root, model, patch = world
    stray = root / name.format(pid=_dead_pid())
    stray.mkdir()
    (stray / "theirs.txt").write_text("someone else's")
    code, err, out = port(capsys, model, patch, root / "ported")
    assert code == 0, err
    assert (stray / "theirs.txt").read_text() == "someone else's"
    assert not os.path.exists(root / "ported" / "theirs.txt")
    assert os.path.exists(root / "ported" / "model.safetensors.index.json")


# -- files that are not files --------------------------------------------------------------------

def test_a_fifo_shard_is_refused_without_hanging(world):
    root, model, patch = world
    shard = os.path.join(model, "model-00001-of-00002.safetensors")
    os.unlink(shard)
    os.mkfifo(shard)
    code, err = run_isolated(["port", "--model", model, "--patch", patch, "--out", str(root / "o"), "--device",
                              "cpu", "--quiet"])
    assert code == 1 and "FIFO" in err and shard in err and "\n" not in err, err
    assert not os.path.exists(root / "o")


def test_a_fifo_adapter_is_refused_without_hanging(world):
    root, model, patch = world
    weights = os.path.join(patch, "adapter_model.safetensors")
    os.unlink(weights)
    os.mkfifo(weights)
    for argv in (["port", "--model", model, "--patch", patch, "--out", str(root / "o"), "--device", "cpu", "--quiet"],
                 ["inspect", patch]):
        code, err = run_isolated(argv)
        assert code == 1 and "FIFO" in err and weights in err and "\n" not in err, (argv[0], err)


def test_a_fifo_config_is_refused_without_hanging(world):
    root, model, patch = world
    cfg = os.path.join(model, "config.json")
    os.unlink(cfg)
    os.mkfifo(cfg)
    code, err = run_isolated(["port", "--model", model, "--patch", patch, "--out", str(root / "o"), "--device",
                              "cpu", "--quiet"])
    assert code == 1 and "FIFO" in err and cfg in err and "\n" not in err, err
    assert not os.path.exists(root / "o")


def test_a_device_named_like_a_tokenizer_is_refused(world, capsys):
    root, model, patch = world
    dev = os.path.join(model, "tokenizer.model")
    try:
        os.mknod(dev, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero clone
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here (needs root): {e}")
    code, err, _ = port(capsys, model, patch, root / "o")
    assert code == 1 and "character device" in err and dev in err and "\n" not in err, err
    assert not os.path.exists(root / "o")


def test_a_socket_in_a_subdirectory_is_refused(world, capsys):
    root, model, patch = world
    sub = os.path.join(model, "extra")
    os.mkdir(sub)
    path = os.path.join(sub, "s.sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    except OSError as e:
        pytest.skip(f"cannot bind a unix socket here: {e}")
    try:
        code, err, _ = port(capsys, model, patch, root / "o")
        assert code == 1 and "socket" in err and path in err, err
        assert not os.path.exists(root / "o")
    finally:
        s.close()


def test_links_below_the_top_level_are_not_followed(world, capsys):
    """Links inside a subdirectory of the model, to a file or a directory outside it, are not copied;
    the report lists them."""
    root, model, patch = world
    secret = root / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("not part of the model")
    sub = os.path.join(model, "tokenizer")
    os.mkdir(sub)
    with open(os.path.join(sub, "vocab.txt"), "w") as f:
        f.write("a b c")
    os.symlink(secret / "key.txt", os.path.join(sub, "file-link"))
    os.symlink(secret, os.path.join(sub, "dir-link"))
    cli.main(["port", "--model", model, "--patch", patch, "--out", str(root / "o"), "--device", "cpu"])
    cap = capsys.readouterr()
    out = root / "o" / "tokenizer"
    assert sorted(os.listdir(out)) == ["vocab.txt"]
    assert "tokenizer/file-link is a symbolic link" in cap.out and "tokenizer/dir-link" in cap.out
    assert (secret / "key.txt").read_text() == "not part of the model"


# -- inputs that change --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["in-place", "replaced", "config"])
def test_an_input_rewritten_during_the_port_fails_without_output(world, capsys, monkeypatch, how):
    root, model, patch = world
    import importlib

    P = importlib.import_module("portllm.port")

    shard = os.path.join(model, "model-00001-of-00002.safetensors")
    real = P._copy_other_files

    def rewrite_then_copy(*a, **k):
        real(*a, **k)
        if how == "in-place":  # same inode, same size: new values
            with open(shard, "r+b") as f:
                f.seek(-4, os.SEEK_END)
                f.write(b"\x01\x02\x03\x04")
        elif how == "replaced":  # a new file renamed over it (what save_pretrained does)
            tensors = make_checkpoint(root / "other", seed=7)
            os.replace(os.path.join(root / "other", "model-00001-of-00002.safetensors"), shard)
            assert tensors
        else:
            with open(os.path.join(model, "config.json"), "a") as f:
                f.write(" ")

    monkeypatch.setattr(P, "_copy_other_files", rewrite_then_copy)
    code, err, _ = port(capsys, model, patch, root / "o")
    assert code == 1 and "while it was being read" in err and "nothing was written" in err, err
    assert not os.path.exists(root / "o")
    assert [e for e in sorted(os.listdir(root)) if e not in ("other",)] == ["models", "patch"], os.listdir(root)


# -- casts ---------------------------------------------------------------------------------------

def test_a_cast_that_overflows_is_refused_naming_the_tensor(world, capsys):
    """--dtype float16 with a bf16 value above 65504 in a tensor the patch does not touch."""
    root, model, patch = world
    idx = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    key = "model.embed_tokens.weight"
    fname = idx["weight_map"][key]
    path = os.path.join(model, fname)
    from portllm.safetensors_io import SafetensorsReader

    with SafetensorsReader(path) as rd:
        tensors = {k: rd[k].clone() for k in rd.keys()}
    tensors[key][3, 5] = 70000.0
    write_tensors(path, tensors, {"format": "pt"})
    before = snapshot(model, patch)
    code, err, _ = port(capsys, model, patch, root / "o", "--dtype", "float16")
    assert code == 1 and key in err and "overflows" in err and "\n" not in err, err
    assert not os.path.exists(root / "o")
    assert snapshot(model, patch) == before
    # The largest bf16 value below float16's largest (65504) is no overflow (65504 itself is
    # 65536 in bf16, which is one).
    tensors[key][3, 5] = 65280.0
    write_tensors(path, tensors, {"format": "pt"})
    code, err, _ = port(capsys, model, patch, root / "o", "--dtype", "float16")
    assert code == 0, err
    from portllm.checkpoint import Checkpoint

    with Checkpoint(str(root / "o")) as ck:
        t = ck.tensor(key)
        assert t.dtype == torch.float16 and bool(torch.isfinite(t).all())


def test_a_nan_in_the_source_is_not_called_an_overflow(world, capsys):
    root, model, patch = world
    key = "model.embed_tokens.weight"
    idx = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    path = os.path.join(model, idx["weight_map"][key])
    from portllm.safetensors_io import SafetensorsReader

    with SafetensorsReader(path) as rd:
        tensors = {k: rd[k].clone() for k in rd.keys()}
    tensors[key][0, 0] = float("inf")
    write_tensors(path, tensors, {"format": "pt"})
    code, err, _ = port(capsys, model, patch, root / "o", "--dtype", "float16")
    assert code == 0, err


# -- a Hugging Face hub cache snapshot -----------------------------------------------------------

def _hub_snapshot(root, model):
    """model laid out as huggingface_hub caches it: blobs/HASH files, snapshots/REV/NAME links."""
    import hashlib

    repo = root / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name in sorted(os.listdir(model)):
        data = open(os.path.join(model, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
    return str(snap)


def test_a_hub_cache_snapshot_ports(world, capsys):
    """Its files are links to ../../blobs: they are the model, followed; the output holds files."""
    root, model, patch = world
    snap = _hub_snapshot(root, model)
    secret = root / "secret.txt"
    secret.write_text("not part of the model")
    os.symlink(secret, os.path.join(snap, "tokenizer.json"))  # a link out of the cached repo
    before = snapshot(str(root / "hub"), patch)
    code, err, _ = port(capsys, snap, patch, root / "o")
    assert code == 0, err
    out = root / "o"
    assert sorted(os.listdir(out)) == sorted(["config.json", "model-00001-of-00002.safetensors",
                                              "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                                              "portllm_port.json"])
    assert not any(os.path.islink(out / n) for n in os.listdir(out))
    assert snapshot(str(root / "hub"), patch) == before
    direct = root / "o2"
    assert port(capsys, model, patch, direct)[0] == 0
    for n in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert open(out / n, "rb").read() == open(direct / n, "rb").read()


def test_a_config_link_out_of_the_model_is_refused(world, capsys):
    root, model, patch = world
    elsewhere = root / "elsewhere.json"
    os.replace(os.path.join(model, "config.json"), elsewhere)
    os.symlink(elsewhere, os.path.join(model, "config.json"))
    code, err, _ = port(capsys, model, patch, root / "o")
    assert code == 1 and "config.json is a symbolic link" in err and "\n" not in err, err
    assert not os.path.exists(root / "o")
