"""Files and directories written whole or not at all, only where the library owns them.

* ``staging_dir(dest)``: everything is written into a hidden temporary directory beside ``dest``,
  synced to disk and renamed onto ``dest`` at the end; an exception (or a kill) never leaves a
  half-written result under ``dest``'s name. The rename is an atomic exchange where the file system
  allows it (Linux ``renameat2(RENAME_EXCHANGE)``), so ``dest`` never goes missing. While it runs, a
  lock file beside ``dest`` (created without following links, and a regular file) makes a second
  writer of the same ``dest`` fail at once. The next writer of that ``dest`` removes temporary
  directories left by killed processes, and only those that carry the owner mark portllm put in
  them (it says so); it never renames anything it did not create onto ``dest``.
* ``safe_join(directory, name)``: a name read from a file (a shard listed in an index) is a plain
  file name, never a path: no separators, not ``.``/``..``, and the result stays inside
  ``directory`` after symlinks are resolved.
* ``check_disjoint(dest, inputs)``: what gets replaced is never an input, inside one, or a parent of
  one, compared both after resolving symlinks and by file identity (device and inode), so a bind
  mount or any other second name of a directory is caught too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator

from portllm.files import ancestry, identity


class UnsafePathError(ValueError):
    """A path the library refuses to write or read: it names the path and the input at stake."""


class DestinationLockedError(RuntimeError):
    """Another process is writing the same destination."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def safe_join(directory: str, name: str, *, what: str = "file name", scope: str | None = None) -> str:
    """``directory/name`` for a plain file ``name`` read from a file; UnsafePathError otherwise.
    The result must resolve inside ``scope`` (default ``directory``; for a hub cache snapshot, the
    cached repository, whose blobs its links point to)."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "\0" in name or "/" in name
            or (os.sep in name) or (os.altsep and os.altsep in name)):
        raise UnsafePathError(f"{what} {name!r} is not a plain file name (no directories, no '..'): refusing it")
    path = os.path.join(directory, name)
    if not _is_within(_real(path), _real(scope if scope is not None else directory)):
        raise UnsafePathError(f"{what} {name!r} resolves outside {directory} (a symlink?): refusing it")
    return path


def check_disjoint(dest: str, inputs: dict[str, str]):
    """Raises UnsafePathError if ``dest`` (to be written or replaced) is an input, lies inside one, or
    contains one. ``inputs`` maps a description ("--model") to a path. Paths are compared after
    resolving symlinks and again by identity (st_dev, st_ino) of the paths and their parents, which
    also sees through bind mounts and other aliases."""
    d = _real(dest)
    dest_chain = ancestry(dest)  # dest (if it exists) and its existing parents, nearest first
    dest_id = identity(d)
    for label, path in inputs.items():
        if path is None:
            continue
        p = _real(path)
        p_chain = ancestry(path)
        p_id = identity(p)
        if d == p or (dest_id is not None and dest_id == p_id):
            raise UnsafePathError(f"the output {dest} is the input {label} ({path}): a write never modifies its input")
        if _is_within(p, d) or (dest_id is not None and dest_id in p_chain):
            raise UnsafePathError(f"the output {dest} contains the input {label} ({path}): replacing it would "
                                  "delete the input; choose another output directory")
        if _is_within(d, p) or (p_id is not None and p_id in dest_chain):
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


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the names ``a`` and ``b`` (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system cannot."""
    global _libc
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove(path: str):
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: str, dest: str):
    """Puts the directory ``new`` at ``dest``, replacing what was there. An existing ``dest`` is
    swapped with ``new`` in one atomic exchange where possible, so ``dest`` is never missing; where
    not, it is first renamed aside to a fresh name of this process's own. What was at ``dest`` is
    then removed."""
    parent = os.path.dirname(os.path.abspath(dest))
    if os.path.lexists(dest):
        if _exchange(new, dest):
            _fsync_dir(parent)
            _remove(new)  # now the previous dest
            return
        old = tempfile.mkdtemp(prefix=f".{_stem(os.path.basename(dest))}.portllm-old-{os.getpid()}-", dir=parent)
        os.rmdir(old)  # a name no one else holds; the rename below takes it
        os.rename(dest, old)
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(old, dest)  # the previous output back under its name
            raise
        _fsync_dir(parent)
        _remove(old)
        return
    os.rename(new, dest)
    _fsync_dir(parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_OWNER = ".portllm-staging"  # inside a staging directory while portllm writes it: "pid name host"


def _host() -> str:
    return os.uname().nodename or "?"


def _owned_by(path: str, pid: int) -> bool:
    """Whether ``path`` is a staging directory portllm made for process ``pid`` (its owner mark)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return False
        fd = os.open(os.path.join(path, _OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        words = os.read(fd, 256).split()
    finally:
        os.close(fd)
    # The pid was checked on this host: a directory another host made (NFS) is not this one's to judge.
    return (len(words) == 3 and words[0] == str(pid).encode() and words[1] == os.path.basename(path).encode()
            and words[2] == _host().encode())


def _clean_stale(parent: str, base: str, log) -> None:
    """Removes the staging directories of ``base`` left by processes that no longer run, if they carry
    the owner mark portllm wrote in them. Anything else with a portllm-like name is left alone and
    reported: portllm never deletes, or renames onto ``dest``, what it cannot prove it made."""
    pat = re.compile(rf"^\.{re.escape(base)}\.portllm-(tmp|old)-(\d+)-.+$|^{re.escape(base)}\.portllm-old-(\d+)$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        m = pat.match(entry)
        if not m:
            continue
        pid = int(m.group(2) or m.group(3))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        if m.group(1) == "tmp" and _owned_by(path, pid):
            _remove(path)
            if log:
                log(f"portllm: removed {path}, left unfinished by process {pid}, which no longer runs")
        elif log:
            log(f"portllm: left {path} alone: a name like portllm's own, from process {pid}, which no longer runs, "
                "but portllm cannot prove it made it (it may be a previous output set aside by a killed "
                "process); remove it yourself if it is not needed")


@contextlib.contextmanager
def _lock(parent: str, base: str, dest: str) -> Iterator[None]:
    path = os.path.join(parent, f".{base}.portllm-lock")
    while True:
        # O_NOFOLLOW: a planted symlink is never followed to create or lock a file elsewhere.
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafePathError(f"the lock file {path} is a symbolic link: refusing to follow it "
                                      f"(remove it if no portllm process is writing {dest})") from None
            raise OSError(e.errno, f"cannot create the lock file {path}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePathError(f"the lock file {path} is not a regular file: refusing to use it")
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


def _stem(base: str) -> str:
    """``base`` as it appears in the names portllm makes beside it (lock, staging): the name itself,
    or, for a name too long to take the prefixes and suffixes within a file name's 255 bytes, its
    start and a hash of the whole."""
    if len(os.fsencode(base)) <= 160:
        return base
    import hashlib

    return os.fsencode(base)[:100].decode("utf-8", "ignore") + "-" + hashlib.sha256(os.fsencode(base)).hexdigest()[:16]


@contextlib.contextmanager
def staging_dir(dest: str, *, log=None, before_replace=None) -> Iterator[str]:
    """Yields an empty temporary directory beside ``dest``; when the block ends normally its
    contents are synced and the directory is renamed onto ``dest`` (replacing what was there), with
    the permissions a new directory gets. On an exception it is removed and ``dest`` is untouched.
    ``before_replace()``, if given, runs under the lock just before the rename (a last check)."""
    dest = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(dest.rstrip(os.sep))
    os.makedirs(parent, exist_ok=True)
    base = _stem(base)
    with _lock(parent, base, dest):
        _clean_stale(parent, base, log)
        tmp = tempfile.mkdtemp(prefix=f".{base}.portllm-tmp-{os.getpid()}-", dir=parent)
        owner = os.path.join(tmp, _OWNER)
        try:
            with open(owner, "x") as f:
                f.write(f"{os.getpid()} {os.path.basename(tmp)} {_host()}\n")
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            fsync_tree(tmp)
            if before_replace is not None:
                before_replace()
            os.unlink(owner)  # last: a kill before here leaves a marked directory, which the next run removes
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
