"""Compiling one Triton kernel for an NVIDIA target on a machine without a GPU, as the JIT would at
launch: Triton's own binder specialises the arguments (pointers 16-byte aligned, as a fresh CUDA
allocation is; sizes divisible by 16 marked so; a size of 1 made a constant), then
``triton.compile`` runs for ``GPUTarget("cuda", cc, 32)`` with the bundled ptxas. The result is
cached by a hash of the kernel's module source, Triton's version, the arguments and the target."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile

from portllm.inspection import sass, toolchain


def cache_dir() -> str:
    return os.environ.get("PORTLLM_INSPECT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "portllm",
                                                                    "inspect")


def cached(path: str):
    """The JSON cached at ``path``, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def store(path: str, obj) -> None:
    """Caches ``obj`` at ``path`` (written whole, then renamed). A cache that cannot be written (a
    read-only home) costs a recompile next time, nothing more."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp_path = f"{path}.{os.getpid()}.tmp"
        with open(tmp_path, "w") as f:
            json.dump(obj, f)
        os.replace(tmp_path, path)
    except OSError:
        pass


def _key(fn, args, meta, cc) -> str:
    import triton

    src = inspect.getsource(inspect.getmodule(fn.fn)) + inspect.getsource(sass)  # the kernel, and what counts it
    blob = json.dumps([triton.__version__, src, fn.fn.__name__, [str(a) for a in args], sorted(meta.items()), cc])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _mock(arg):
    """'bfloat16' and the like stand for a tensor of that dtype; ints are passed as they are."""
    if isinstance(arg, str):
        import torch
        from triton.runtime.jit import MockTensor

        return MockTensor(getattr(torch, arg))
    return arg


def compile_stats(fn, args: tuple, meta: dict, cc: int) -> dict:
    """sass.stats of ``fn`` compiled for sm_{cc} (sm_90a for 90) with ``args`` and ``meta`` (constexprs,
    num_warps, num_stages), plus the launch's threads; from the cache when the source is unchanged."""
    path = os.path.join(cache_dir(), _key(fn, args, meta, cc) + ".json")
    hit = cached(path)
    if hit is not None:
        return hit
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = dict(meta, debug=False)
    bound, spec, opts = binder(*[_mock(a) for a in args], **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        cub = os.path.join(tmp, "k.cubin")
        with open(cub, "wb") as f:
            f.write(ck.asm["cubin"])
        out = sass.stats(cub, toolchain.cuobjdump())
    out["threads"] = 32 * ck.metadata.num_warps
    out["stages"] = ck.metadata.num_stages
    store(path, out)
    return out
