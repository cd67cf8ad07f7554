// csrc/cuda/lora_expand.cu built for the CUDA emulation (see ops.cpp beside this file).
#include "cuda/lora_expand.cu"
