"""Reading inputs safely: only regular files, never through a link out of a tree, and noticing an
input that changes while it is read.

* ``open_regular(path, what)``: opens a file for reading only if it is a regular file. A FIFO, a
  device, a socket or a directory is refused by name before anything blocks on it: the open is
  non-blocking and the type is checked on the descriptor that was opened, so nothing can swap the
  file between a check and the open.
* ``copy_tree(src, dst)``: copies the regular files and directories under ``src``; symbolic links at
  any depth are never followed (each is skipped and listed for the report); anything else that is
  not a regular file is refused by name.
* ``identity(path)`` and ``same_file(a, b)``: a file is the same file when its device and inode
  are, whatever path reaches it (symlinks, bind mounts, hard links).
* ``InputWatch``: records the identity, size and modification time of every input file when it is
  opened, and ``check()`` fails if any of them changed since (a shard rewritten during a port).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat

_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


class NotARegularFileError(ValueError):
    """An input that is not a regular file (FIFO, device, socket, directory): the message names it."""


class InputChangedError(RuntimeError):
    """An input file changed while portllm was reading it: the message names the file."""


def kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str, what: str = "file", *, binary: bool = True):
    """``open(path)`` for reading, if ``path`` is a regular file (links to one are followed: a
    checkpoint's own links are checked by its caller); NotARegularFileError naming ``what`` and
    ``path`` otherwise. FileNotFoundError / PermissionError pass through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(f"{what} {path} is {kind(st.st_mode)}, not a regular file: refusing to read it")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb" if binary else "r")
    except BaseException:
        os.close(fd)
        raise


def link_scope(model_dir: str) -> str:
    """The directory a model directory's symbolic links may point into: the model directory itself,
    or, for a Hugging Face hub cache snapshot (``.../models--ORG--NAME/snapshots/REV``, whose files
    are links to ``../../blobs/HASH``), the cached repository ``.../models--ORG--NAME``."""
    real = os.path.realpath(model_dir)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if (os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(("models--", "datasets--"))
            and os.path.isdir(os.path.join(repo, "blobs"))):
        return repo
    return real


def within(path: str, scope: str) -> bool:
    """Whether ``path``, resolved, lies inside the directory ``scope`` (resolved)."""
    p, d = os.path.realpath(path), os.path.realpath(scope)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def identity(path: str, *, follow: bool = True) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path``, None if it does not exist."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def ancestry(path: str) -> list[tuple[int, int]]:
    """Identities of ``path`` (if it exists) and of every existing directory above it, nearest first.
    Walked up the resolved path, so two names of one directory (a bind mount, a symlink) give the
    same identities."""
    out = []
    p = os.path.realpath(os.path.abspath(os.fspath(path)))
    while True:
        ident = identity(p)
        if ident is not None:
            out.append(ident)
        parent = os.path.dirname(p)
        if parent == p:
            return out
        p = parent


def copy_file(src: str, dst: str, what: str = "file", watch: InputWatch | None = None):
    """Copies a regular file's bytes and permission bits (never a FIFO's or a device's); the file as
    opened is added to ``watch``."""
    with open_regular(src, what) as fin:
        if watch is not None:
            watch.add_fd(src, fin)
        mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode)
        with open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    os.chmod(dst, mode)


def copy_tree(src: str, dst: str, *, what: str = "file", skipped: list[str] | None = None, rel: str = "",
              watch: InputWatch | None = None):
    """Copies the directory ``src`` to ``dst`` (which must not exist): directories and regular files
    only. A symbolic link at any depth is not followed: its path relative to the top is appended to
    ``skipped``. Any other kind of file is refused (NotARegularFileError naming it)."""
    os.mkdir(dst)
    with os.scandir(src) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        name = os.path.join(rel, e.name)
        if e.is_symlink():
            if skipped is not None:
                skipped.append(name)
            continue
        if e.is_dir(follow_symlinks=False):
            copy_tree(e.path, os.path.join(dst, e.name), what=what, skipped=skipped, rel=name, watch=watch)
        elif e.is_file(follow_symlinks=False):
            copy_file(e.path, os.path.join(dst, e.name), what=what, watch=watch)
        else:
            mode = e.stat(follow_symlinks=False).st_mode
            raise NotARegularFileError(f"{what} {e.path} is {kind(mode)}, not a regular file: refusing to copy it")


class InputWatch:
    """The state of every input file read, to prove at the end that none changed meanwhile."""

    def __init__(self):
        self._seen: dict[str, tuple] = {}

    @staticmethod
    def _state(st: os.stat_result) -> tuple:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def add(self, path: str, st: os.stat_result | None = None):
        self._seen[path] = self._state(st if st is not None else os.stat(path))

    def add_fd(self, path: str, fileobj):
        self.add(path, os.fstat(fileobj.fileno()))

    def check(self):
        """InputChangedError naming the first input whose identity, size or modification time moved."""
        for path, before in self._seen.items():
            try:
                now = self._state(os.stat(path))
            except OSError as e:
                raise InputChangedError(f"input {path} disappeared while it was being read ({e.strerror}); "
                                        "nothing was written") from None
            if now[:2] != before[:2]:
                raise InputChangedError(f"input {path} was replaced by another file while it was being read; "
                                        "nothing was written: run again once it is stable")
            if now != before:
                raise InputChangedError(f"input {path} was modified while it was being read (size or modification "
                                        "time changed); nothing was written: run again once it is stable")
