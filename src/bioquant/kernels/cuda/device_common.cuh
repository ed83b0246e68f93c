// Shared by every kernel of the CUDA backend: the error check, the constant tables (codebooks, the
// nf4/fp4 byte-permute tables, the dependent-launch knob), programmatic dependent launch, and
// asynchronous copies into shared memory.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cuda/bnb4_permute_tables.h"

namespace bioquant {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
#define CUDA_OK(call) cuda_check((call), #call)

__constant__ int16_t c_nf4_q14[16];
__constant__ int16_t c_fp4_q14[16];
// The same levels as byte-permute tables (a Bnb4PermuteTables as words: four 2-word tables, then the radix).
constexpr int kBnb4PermuteWords = sizeof(Bnb4PermuteTables) / sizeof(uint32_t);
static_assert(kBnb4PermuteWords == 9, "Bnb4PermuteTables: 8 table words and the radix");
__constant__ uint32_t c_nf4_permute[kBnb4PermuteWords];
__constant__ uint32_t c_fp4_permute[kBnb4PermuteWords];
__constant__ float c_dynamic_map[256];
__constant__ unsigned c_early_blocks;  // see allow_dependents_in_last_wave

// Programmatic dependent launch (sm_90). In a one-token decode step the matvecs and the norm,
// attention and activation kernels between them are launched as dependents of the kernel before
// (BIOQUANT_CUDA_PDL=2: plain launches): their blocks may be placed while that one finishes, and
// wait for it (griddepcontrol.wait: its grid complete, its writes visible) before touching memory,
// which hides part of the launch latency between the ~250 kernels of a step. Without the attribute
// the instructions return at once. The small kernels let the matvec after them start as
// soon as they run; a matvec lets the kernel after it start when it ends (letting it start early,
// its blocks then waiting beside the matvec's, measured 3-7% slower).
__device__ __forceinline__ void await_then_allow() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The matvecs' blocks among the grid's last c_early_blocks (2 per SM) let the kernel after them launch
// at their start; the others when they end. The next kernel's blocks are then placed while the last
// ones drain, and wait (griddepcontrol.wait still waits for the whole grid), without taking slots that
// blocks of the matvec still need: all blocks letting it launch at their start measured 3-7% slower
// (H100), 4 per SM (every block of a one-wave matvec) no faster than none. H200, 8B, tg128, same call:
// q4_k 520 -> 531-533 tok/s (1 per SM 525, 3 per SM 529.5), nf4 408.6 -> 414.1 (BIOQUANT_CUDA_EARLY=N:
// N - 1 per SM; 1: none).
__device__ __forceinline__ void allow_dependents_in_last_wave() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.x - blockIdx.x <= c_early_blocks) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void await_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asynchronous copies into shared memory (sm_80+): issued, committed as groups, then waited for with cp_async_wait_group
// (each thread its own; a __syncthreads after makes them visible to the block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem) : "memory");
}
// Copies issued since the last commit form a group; wait until at most `pending` groups are in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int pending>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory"); }

}  // namespace
}  // namespace bioquant
