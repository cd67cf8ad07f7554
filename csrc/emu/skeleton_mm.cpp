// csrc/cuda/skeleton_mm.cu built for the CUDA emulation (see ops.cpp beside this file).
#include "cuda/skeleton_mm.cu"
