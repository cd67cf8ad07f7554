// The CPU vector paths portllm's C++ kernels take, and which one runs now.
//
// Every CPU device class (portllm.defaults: cpu-avx512bf16, cpu-avx512, cpu-avx2, cpu-generic) and
// every CPU kernel's choice of code path rests on this one detection.
#pragma once
#include <string>

namespace portllm {

// Ordered: a path can run wherever a later one can.
enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// The widest path this CPU runs (its features, read once).
Isa isa_best();
// The path to take now: isa_best(), or a lower one named by PORTLLM_CPU_ISA
// (generic|avx2|avx512|avx512bf16; the tests and benchmarks use it to cover every path on one machine).
Isa isa_for_call();
const char* isa_name(Isa isa);

}  // namespace portllm
