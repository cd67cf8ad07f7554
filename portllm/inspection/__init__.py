"""What portllm's GPU kernels compile to, judged without a GPU.

Triton compiles for ``GPUTarget("cuda", 90, 32)`` (sm_90a) and for sm_80 on any machine, with the
ptxas it bundles, and its bundled cuobjdump disassembles the result; nvcc, where installed, compiles
the CUDA sources for both (``cuda``), and the same cuobjdump counts each kernel in its object. Each hot-path kernel is compiled
here exactly as its launcher would launch it (``designs``: the launcher's own block sizes and warps,
the JIT's specialisation of 16-byte aligned pointers and sizes), and what its design intends is
checked in the machine code (``checks``): tensor-core instructions where it multiplies on them, no
local-memory spills, 128-bit accesses to W, vectorized or asynchronous factor loads, and registers
within the budget of the intended occupancy. ``python -m portllm.inspection`` prints the table;
``tests/test_kernel_inspect.py`` asserts it, a known fault marked as such until it is fixed.

Results are cached by a hash of the kernel's source, Triton's (or nvcc's) version and the configuration
(``$PORTLLM_INSPECT_CACHE``, default ``~/.cache/portllm/inspect``).
"""
