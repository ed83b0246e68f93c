// Built instead of gpu_decoder.cu when CUDA is off: no devices, and a clear error if one is asked for.
#include <string>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant {

int cuda_device_count() { return 0; }

std::string cuda_device_description(int) { throw Error("this build has no CUDA backend"); }

double cuda_copy_bandwidth(int) { throw Error("this build has no CUDA backend"); }

struct GpuDecoder::Impl {};

GpuDecoder::GpuDecoder(const Model&, int, KvType, bool) {
  throw Error("this build has no CUDA backend (configure with -DBIOQUANT_CUDA=ON)");
}
GpuDecoder::~GpuDecoder() = default;
void GpuDecoder::forward(const int32_t*, int64_t, KVCache&, int64_t, float*) {}
void GpuDecoder::forward_batch(std::span<const DecodeSegment>) {}
void GpuDecoder::set_host_pool(ThreadPool*) {}
void GpuDecoder::copy_prefix(const KVCache&, const KVCache&, int64_t) {}
void GpuDecoder::release(const KVCache&) {}
GpuMemory GpuDecoder::memory() const { return {}; }
int GpuDecoder::device() const { return -1; }
std::string GpuDecoder::prompt_matmuls() const { return {}; }
int64_t GpuDecoder::prompt_gemm_tokens() const { return 0; }
int64_t GpuDecoder::prompt_chunk(std::span<const DecodeSegment>) { return 0; }
void* cuda_pinned_alloc(size_t) { throw Error("this build has no CUDA backend (page-locked memory)"); }
void cuda_pinned_free(void*) {}
void set_cuda_memory_limit(size_t) {}
size_t cuda_memory_limit() { return 0; }
size_t cuda_memory_used(int) { return 0; }

}  // namespace bioquant
