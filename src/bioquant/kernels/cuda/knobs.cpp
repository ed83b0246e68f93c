#include "bioquant/kernels/cuda/knobs.h"

#include <cstdlib>

#include "bioquant/core/error.h"

namespace bioquant {
namespace {

// The variable's value, or nothing when it is unset or empty.
std::optional<std::string> knob_value(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

// Digits only (no sign, no spaces), at most `max`.
std::optional<long long> parse_count(const std::string& s, long long max) {
  if (s.empty() || s.size() > 12) return std::nullopt;
  long long n = 0;
  for (const char c : s) {
    if (c < '0' || c > '9') return std::nullopt;
    n = 10 * n + (c - '0');
  }
  if (n > max) return std::nullopt;
  return n;
}

}  // namespace

int cuda_knob_int(const char* name, int fallback) {
  const std::optional<std::string> v = knob_value(name);
  if (!v) return fallback;
  const std::optional<long long> n = parse_count(*v, 1LL << 30);
  check(n && *n > 0, std::string(name) + "=" + *v + ": expected a positive integer (unset for the default; a switch's off is 2)");
  return static_cast<int>(*n);
}

std::string cuda_gemm_knob() {
  const std::string v = knob_value("BIOQUANT_CUDA_GEMM").value_or("");
  check(v.empty() || v == "0" || v == "mma",
        "BIOQUANT_CUDA_GEMM=" + v + ": expected 0 (the integer kernels) or mma (tensor cores without cuBLAS); unset for cuBLAS");
  return v;
}

std::optional<size_t> cuda_stack_knob() {
  const std::optional<std::string> v = knob_value("BIOQUANT_CUDA_STACK");
  if (!v) return std::nullopt;
  const std::optional<long long> n = parse_count(*v, 1LL << 20);
  check(n.has_value(), "BIOQUANT_CUDA_STACK=" + *v + ": expected bytes per thread (0 to 1048576)");
  return static_cast<size_t>(*n);
}

}  // namespace bioquant
