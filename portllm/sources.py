"""Which source a backend's kernel is built from, as a hash, so that a default backend is only ever
chosen on measurements of the kernel as it is now (``tools/gen_defaults.py``, ``portllm info``).

A kernel's source is the files that implement it for one backend: for ``cpp``, the C++ files of the
op in ``csrc/cpu/`` and the vector-path dispatch (``isa.*``); for ``cuda``, the op's files in
``csrc/cuda/`` and their shared headers; for ``triton``, the op's module in ``kernels/`` and the
rounding helpers it imports. The Python wrappers and the reference are not part of it: they are the
same for every backend, and the reference is what each backend is measured against in the same run.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# op -> the file-name stems of its kernels. The two serving ops are measured together (one benchmark
# times shrink and expand in one layer), so each one's source is both's.
_SERVING = ["lora_shrink", "lora_expand", "lora_groups", "lora_slots"]
_STEMS = {"patch_add_": ["patch_add"], "patch_add_experts_": ["patch_add"], "skeleton_mm": ["skeleton_mm"],
          "lora_shrink": _SERVING, "lora_expand_": _SERVING, "bit_misses": ["bit_misses"], "fp8_merge": ["fp8_merge"],
          "mxfp4_merge": ["mxfp4_merge"]}
# (backend, stem) -> the shared files those kernels include: the vector-path dispatch (csrc/cpu/isa.h),
# the CUDA headers, the Triton rounding helpers
_SHARED = {("cpp", "patch_add"): ["csrc/cpu/isa.cpp", "csrc/cpu/isa.h"],
           ("cpp", "fp8_merge"): ["csrc/cpu/isa.cpp", "csrc/cpu/isa.h"],
           ("cuda", None): ["csrc/cuda/*.cuh"], ("triton", None): ["kernels/rounding.py"]}
_DIRS = {"cpp": "csrc/cpu", "cuda": "csrc/cuda", "triton": "kernels"}
_EXTENSIONS = {"cpp": (".cpp", ".h"), "cuda": (".cu", ".cuh"), "triton": (".py",)}  # (not editor leftovers)


def select(names: list[str], op: str, backend: str) -> list[str]:
    """Of the paths ``names`` (relative to a checkout's root, "/"-separated), the source files of
    ``op``'s ``backend`` kernel, sorted; [] where that backend has no kernel of ``op`` among them."""
    if backend not in _DIRS:
        return []
    stems = _STEMS.get(op, [op.rstrip("_")])
    names = [n for n in names if n.endswith(_EXTENSIONS[backend])]
    own = {n for n in names for stem in stems if fnmatch.fnmatch(n, f"{_DIRS[backend]}/{stem}*")}
    if not own:
        return []
    for stem in [None, *stems]:
        own.update(n for n in names for pattern in _SHARED.get((backend, stem), []) if fnmatch.fnmatch(n, pattern))
    return sorted(own)


def files(op: str, backend: str, root: str = ROOT) -> list[str]:
    """The source files of ``op``'s ``backend`` kernel under ``root`` (a checkout; an installed package
    has no ``csrc/``), relative to it; [] where there are none (the reference has none)."""
    names = []
    for d in set(_DIRS.values()):
        for path in glob.glob(os.path.join(root, d, "*")):
            if os.path.isfile(path):
                names.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return select(names, op, backend)


def digest(contents: dict[str, bytes]) -> str:
    """The hash of files given as {relative path: bytes} (names and contents, in name order)."""
    h = hashlib.sha256()
    for name in sorted(contents):
        h.update(name.encode() + b"\0" + str(len(contents[name])).encode() + b"\0" + contents[name])
    return h.hexdigest()[:16]


def source_hash(op: str, backend: str, root: str = ROOT) -> str | None:
    """The hash of ``op``'s ``backend`` kernel source under ``root``, or None where it has none there."""
    names = files(op, backend, root)
    if not names:
        return None
    contents = {}
    for name in names:
        with open(os.path.join(root, name), "rb") as f:
            contents[name] = f.read()
    return digest(contents)


def source_hash_at(commit: str, op: str, backend: str, root: str = ROOT) -> str | None:
    """``source_hash`` of the kernel as committed in ``commit`` of the git checkout at ``root``; None where
    it had none, or git cannot tell."""
    import subprocess

    def git(*args) -> bytes:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, check=True).stdout

    try:
        names = git("ls-tree", "-r", "--name-only", commit, "--", *sorted(set(_DIRS.values()))).decode().split()
        chosen = select(names, op, backend)
        return digest({n: git("show", f"{commit}:{n}") for n in chosen}) if chosen else None
    except (OSError, subprocess.CalledProcessError):
        return None
