#include "bioquant/kernels/cpu/cpu_kernels.h"

#include <cstdlib>

#include "bioquant/core/error.h"

namespace bioquant {
namespace {

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

const CpuKernels& choose() {
  const char* forced = std::getenv("BIOQUANT_CPU_ISA");
  const auto available = available_cpu_kernels();
  if (forced == nullptr || *forced == '\0') return *available.back();
  for (const CpuKernels* k : available) {
    if (std::string(forced) == k->isa) return *k;
  }
  throw Error(std::string("BIOQUANT_CPU_ISA=") + forced + " is not available on this CPU (choose scalar, avx2 or avx512)");
}

}  // namespace

std::vector<const CpuKernels*> available_cpu_kernels() {
  std::vector<const CpuKernels*> out{&scalar_kernels()};
  if (cpu_has_avx2()) out.push_back(&avx2_kernels());
  if (cpu_has_avx512()) out.push_back(&avx512_kernels());
  return out;
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels& chosen = choose();
  return chosen;
}

}  // namespace bioquant
