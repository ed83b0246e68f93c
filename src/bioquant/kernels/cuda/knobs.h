// The BIOQUANT_CUDA_* environment knobs: settings for comparing kernel variants (bench/cuda-notes.md
// lists them; the defaults are the measured best). Plain C++, parsed on the host and checked by the
// unit tests in every build, GPU or not.
//
// A knob that is set must say something: a 0 or a typo read as the default once made an A/B run
// compare a setting with itself, so they are errors that name the knob.
#pragma once
#include <cstddef>
#include <optional>
#include <string>

namespace bioquant {

// An integer knob: `fallback` when unset or empty, else a positive integer up to 2^30 (a switch's
// "off" is 2). Anything else throws Error.
int cuda_knob_int(const char* name, int fallback);

// BIOQUANT_CUDA_GEMM, how prompts multiply: "" (unset: cuBLAS), "0" (the integer kernels) or "mma"
// (tensor cores without cuBLAS). Anything else throws Error.
std::string cuda_gemm_knob();

// BIOQUANT_CUDA_STACK, the per-thread stack limit in bytes (0 to 1 MiB), or nothing when unset or
// empty. Anything else throws Error.
std::optional<size_t> cuda_stack_knob();

}  // namespace bioquant
