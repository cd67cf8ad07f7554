"""Files and directories written whole or not at all, only where the library owns them.

* ``staging_dir(dest)``: everything is written into a hidden temporary directory beside ``dest``,
  synced to disk and renamed onto ``dest`` at the end; an exception (or a kill) never leaves a
  half-written result under ``dest``'s name. While it runs, a lock file beside ``dest`` makes a
  second writer of the same ``dest`` fail at once. Temporary directories left by killed processes
  are removed by the next writer of that ``dest`` (and it says so).
* ``safe_join(directory, name)``: a name read from a file (a shard listed in an index) is a plain
  file name, never a path: no separators, not ``.``/``..``, and the result stays inside
  ``directory`` after symlinks are resolved.
* ``check_disjoint(dest, inputs)``: what gets replaced is never an input, inside one, or a parent of
  one (compared after resolving symlinks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator


class UnsafePathError(ValueError):
    """A path the library refuses to write or read: it names the path and the input at stake."""


class DestinationLockedError(RuntimeError):
    """Another process is writing the same destination."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def safe_join(directory: str, name: str, *, what: str = "file name") -> str:
    """``directory/name`` for a plain file ``name`` read from a file; UnsafePathError otherwise."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "\0" in name or "/" in name
            or (os.sep in name) or (os.altsep and os.altsep in name)):
        raise UnsafePathError(f"{what} {name!r} is not a plain file name (no directories, no '..'): refusing it")
    path = os.path.join(directory, name)
    if not _is_within(_real(path), _real(directory)):
        raise UnsafePathError(f"{what} {name!r} resolves outside {directory} (a symlink?): refusing it")
    return path


def check_disjoint(dest: str, inputs: dict[str, str]):
    """Raises UnsafePathError if ``dest`` (to be written or replaced) is an input, lies inside one, or
    contains one. ``inputs`` maps a description ("--model") to a path."""
    d = _real(dest)
    for label, path in inputs.items():
        if path is None:
            continue
        p = _real(path)
        if d == p:
            raise UnsafePathError(f"the output {dest} is the input {label} ({path}): a write never modifies its input")
        if _is_within(p, d):
            raise UnsafePathError(f"the output {dest} contains the input {label} ({path}): replacing it would "
                                  "delete the input; choose another output directory")
        if _is_within(d, p):
            raise UnsafePathError(f"the output {dest} lies inside the input {label} ({path}): a write never "
                                  "modifies its input; choose a directory outside it")


def fsync_tree(path: str):
    """Flushes every file under ``path`` (and the directories) to disk."""
    for root, dirs, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj, **kwargs):
    """Writes JSON to a temporary name, syncs it and renames it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_dir(new: str, dest: str):
    """Renames new to dest; an existing dest is moved aside first and removed after."""
    old = None
    if os.path.lexists(dest):
        old = f"{dest}.portllm-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(new, dest)
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))
    if old:
        if os.path.islink(old) or not os.path.isdir(old):
            os.unlink(old)
        else:
            shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(parent: str, base: str, log) -> None:
    """Removes temporary directories of ``base`` left by processes that no longer run; puts back a
    previous result that a killed rename left aside."""
    pat = re.compile(rf"^(?:\.{re.escape(base)}\.portllm-tmp-(\d+)-.+|{re.escape(base)}\.portllm-old-(\d+))$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = pat.match(entry)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        if m.group(2) and not os.path.lexists(os.path.join(parent, base)):
            os.rename(path, os.path.join(parent, base))
            if log:
                log(f"portllm: restored {os.path.join(parent, base)} from {entry}, left by a process that was killed")
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
        if log:
            log(f"portllm: removed {path}, left unfinished by process {pid}, which no longer runs")


@contextlib.contextmanager
def _lock(parent: str, base: str, dest: str) -> Iterator[None]:
    path = os.path.join(parent, f".{base}.portllm-lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DestinationLockedError(
                    f"another portllm process is writing {dest} (lock {path}); wait for it to finish") from None
            raise
        try:  # the lock file may have been removed (and recreated) by the holder we waited on
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def staging_dir(dest: str, *, log=None, before_replace=None) -> Iterator[str]:
    """Yields an empty temporary directory beside ``dest``; when the block ends normally its
    contents are synced and the directory is renamed onto ``dest`` (replacing what was there), with
    the permissions a new directory gets. On an exception it is removed and ``dest`` is untouched.
    ``before_replace()``, if given, runs under the lock just before the rename (a last check)."""
    dest = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(dest.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    with _lock(parent, base, dest):
        _clean_stale(parent, base, log)
        tmp = tempfile.mkdtemp(prefix=f".{base}.portllm-tmp-{os.getpid()}-", dir=parent)
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            fsync_tree(tmp)
            if before_replace is not None:
                before_replace()
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
