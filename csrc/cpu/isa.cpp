// CPU feature detection for the kernels' vector paths (csrc/cpu/isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "portllm.h"

namespace portllm {

namespace {
constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512", "avx512bf16"};

Isa detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::Avx512Bf16;
  if (avx512) return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return Isa::Avx2;
  }
#endif
  return Isa::Generic;
}
}  // namespace

Isa isa_best() {
  static const Isa best = detect();
  return best;
}

Isa isa_for_call() {
  const Isa best = isa_best();
  const char* env = std::getenv("PORTLLM_CPU_ISA");
  if (env == nullptr || *env == 0) return best;
  const std::string want(env);
  for (int i = 0; i < 4; ++i) {
    if (want == kIsaNames[i]) return std::min(best, static_cast<Isa>(i));
  }
  TORCH_CHECK(false, "PORTLLM_CPU_ISA=", want, " is not a CPU path; choose generic, avx2, avx512 or avx512bf16");
}

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

std::string cpu_isa_best() { return isa_name(isa_best()); }
std::string cpu_isa_for_call() { return isa_name(isa_for_call()); }

}  // namespace portllm
