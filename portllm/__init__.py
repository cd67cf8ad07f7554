"""portllm: portable LoRA patches (PortLLM) and skeleton fine-tuning (PMSS), with Triton, C++ and
CUDA kernels behind a thin PyTorch layer."""

from portllm._version import __version__  # noqa: F401
from portllm import _ext  # noqa: E402,F401  (loads portllm._C first, warns once if missing)
from portllm import ops  # noqa: E402
from portllm.ops import BackendUnavailableError, available_backends, patch_add_  # noqa: E402

__all__ = ["BackendUnavailableError", "available_backends", "ops", "patch_add_", "__version__"]

from portllm.apply import apply_patch, exact_merges, remove_patch  # noqa: E402
from portllm.exact import ExactUndoError  # noqa: E402
from portllm.compat import CompatReport, IncompatiblePatchError, check_compatibility  # noqa: E402
from portllm.extract import extract_patch  # noqa: E402
from portllm.patch import Patch, PatchFormatError, PatchModule  # noqa: E402
from portllm.port import port  # noqa: E402
from portllm import pmss  # noqa: E402
from portllm import serve  # noqa: E402

__all__ += ["CompatReport", "ExactUndoError", "exact_merges", "IncompatiblePatchError", "Patch", "PatchFormatError", "PatchModule",
            "apply_patch", "check_compatibility", "extract_patch", "pmss", "port", "remove_patch", "serve"]
