// Compile-check shim, used only by tools/check_cuda.py and searched after torch's own headers.
// torch's CPU wheels ship c10/cuda headers but not this generated one; a CUDA build of torch has
// the real file (same content), which takes precedence.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
