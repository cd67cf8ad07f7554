"""portllm: portable LoRA patches (PortLLM) and skeleton fine-tuning (PMSS), with Triton, C++ and
CUDA kernels behind a thin PyTorch layer.

The names below load on first use (PEP 562), so that ``import portllm`` alone, and the command
line's ``--help`` and ``--version``, do not import torch (about a second); ``portllm.port`` loads the
port alone, without PMSS's torch.distributed (half a second more). The kernels (``portllm._C``)
load with the first op, and say then, once, if they were not built.
"""

import importlib
import sys
import types

from portllm._version import __version__  # noqa: F401

_WHERE = {
    "BackendUnavailableError": "portllm.ops", "available_backends": "portllm.ops", "patch_add_": "portllm.ops",
    "apply_patch": "portllm.apply", "exact_merges": "portllm.apply", "remove_patch": "portllm.apply",
    "ExactUndoError": "portllm.exact",
    "CompatReport": "portllm.compat", "IncompatiblePatchError": "portllm.compat",
    "check_compatibility": "portllm.compat",
    "check_portability": "portllm.check", "PortabilityReport": "portllm.check",
    "extract_patch": "portllm.extract",
    "Patch": "portllm.patch", "PatchFormatError": "portllm.patch", "PatchModule": "portllm.patch",
    "port": "portllm.port",
}
_SUBMODULES = ("ops", "pmss", "serve")

__all__ = sorted([*_WHERE, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"portllm.{name}")
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'portllm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``portllm.port`` is the function, as it always was: the import system's binding of the
    submodule ``portllm.port`` onto the package, when that module first loads, is not kept."""

    def __setattr__(self, name, value):
        if name == "port" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
