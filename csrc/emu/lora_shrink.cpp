// csrc/cuda/lora_shrink.cu built for the CUDA emulation (see ops.cpp beside this file).
#include "cuda/lora_shrink.cu"
