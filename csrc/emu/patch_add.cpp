// csrc/cuda/patch_add.cu built for the CUDA emulation (see ops.cpp beside this file).
#include "cuda/patch_add.cu"
