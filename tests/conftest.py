import os

# Triton runs on CPU tensors only in its interpreter, which must be chosen before triton is
# imported. Where a GPU is present, Triton runs for real on it instead.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import BACKEND_CASES, CUDA, backend_id  # noqa: E402


@pytest.fixture(params=BACKEND_CASES, ids=backend_id)
def backend(request, monkeypatch):
    """Yields (backend name, device) and skips where that backend cannot run."""
    name, device, env = request.param
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device")
    from portllm import ops

    reason = ops.backend_unavailable_reason(name, device)
    if reason is not None:
        pytest.skip(reason)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    isa = env.get("PORTLLM_CPU_ISA")
    if isa is not None:
        from portllm import _ext

        if _ext.cpu_isa() != isa:
            pytest.skip(f"this CPU has no {isa} path (it runs {_ext.cpu_isa()})")
    return name, torch.device(device)
