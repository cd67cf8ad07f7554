"""SequentialFile (portllm.direct_file): the bytes appended are the file's bytes, through O_DIRECT or
the page cache, across staging-buffer boundaries and with parts read from another file; a file system
that refuses O_DIRECT writes gets them through the page cache; a source that ends early is named."""

import errno
import os

import pytest
import torch

from portllm import direct_file
from portllm.direct_file import ALIGN, SequentialFile


def pieces(seed: int, total: int):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=g)
    cuts = sorted(torch.randint(0, total, (40,), generator=g).tolist())
    return data, list(zip([0] + cuts, cuts + [total]))


@pytest.mark.parametrize("hint", [100, 5 << 20], ids=["page-cache", "direct"])
@pytest.mark.parametrize("stage", [ALIGN, 3 * ALIGN, 1 << 20])
def test_bytes_are_the_file(tmp_path, hint, stage):
    total = 5 * stage + 1234  # several stages and a partial last block
    data, parts = pieces(stage, total)
    src = tmp_path / "src"
    src.write_bytes(bytes(data.numpy()))
    out = tmp_path / "out"
    f = SequentialFile(str(out), hint, stage_bytes=stage)
    assert (f._dfd is not None) == (hint >= direct_file.MIN_DIRECT) or not hasattr(os, "O_DIRECT")
    with open(src, "rb") as s:
        for k, (a, b) in enumerate(parts):
            if k % 2:
                f.append_from(s.fileno(), a, b - a, "src")
            else:
                f.append(data[a:b])
    assert f.size == total
    f.close()
    f.close()  # (a second close does nothing)
    assert out.read_bytes() == bytes(data.numpy())


def test_o_direct_refused_at_write_falls_back(tmp_path, monkeypatch):
    real = os.pwrite
    f = SequentialFile(str(tmp_path / "out"), 5 << 20, stage_bytes=ALIGN)
    if f._dfd is None:
        f.abort()
        pytest.skip("this file system refuses O_DIRECT at open: the page-cache path is the other test")
    refused = []

    def pwrite(fd, view, offset):
        if fd == f._dfd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data, _ = pieces(1, 3 * ALIGN + 77)
    f.append(data)
    f.close()
    assert refused and (tmp_path / "out").read_bytes() == bytes(data.numpy())


def test_source_that_ends_early_is_named(tmp_path):
    (tmp_path / "src").write_bytes(b"x" * 100)
    f = SequentialFile(str(tmp_path / "out"), 1000)
    with open(tmp_path / "src", "rb") as s, pytest.raises(OSError, match="shard-7: the file ended 50 bytes early"):
        f.append_from(s.fileno(), 50, 100, "shard-7")
    f.abort()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm (tmpfs) here")
def test_tmpfs(tmp_path):
    """tmpfs refuses O_DIRECT (at open, on most kernels): the bytes are the same through the page cache."""
    data, _ = pieces(2, 3 << 20)
    path = f"/dev/shm/portllm-test-{os.getpid()}"
    try:
        f = SequentialFile(path, data.numel(), stage_bytes=1 << 20)
        f.append(data)
        f.close()
        with open(path, "rb") as r:
            assert r.read() == bytes(data.numpy())
    finally:
        os.unlink(path)


@pytest.mark.parametrize("hint", [100, 5 << 20], ids=["page-cache", "direct"])
def test_write_error_is_the_error(tmp_path, monkeypatch, hint):
    """A full disk: the OSError itself reaches the caller (not a BufferError from unmapping), and abort
    afterwards closes the file quietly."""
    real = os.pwrite
    f = SequentialFile(str(tmp_path / "out"), hint, stage_bytes=ALIGN)

    def pwrite(fd, view, offset):
        if offset >= 2 * ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data, _ = pieces(3, 6 * ALIGN + 5)
    with pytest.raises(OSError) as e:
        f.append(data)
        f.close()
    assert e.value.errno == errno.ENOSPC
    f.abort()
    assert f.closed
