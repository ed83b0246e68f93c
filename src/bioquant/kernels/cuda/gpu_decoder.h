// The CUDA backend: the same decoder forward pass as model/decoder.cpp, on an NVIDIA GPU.
// This header has no CUDA types, so every part of the program can include it; without
// -DBIOQUANT_CUDA=ON (or without a GPU) cuda_device_count() is 0 and GpuDecoder throws.
//
// Weights are uploaded once, in their stored format (the same bytes as on the CPU). Numerics follow
// the CPU engine: activations of quantized matmuls are quantized to int8 per 32 columns exactly as
// quant_gemm does, the integer dot products are exact, only the f32 summation order differs; plain
// (f32/f16/bf16) matmuls run in f32 (bf16 passes of 2-16 tokens: tf32 tensor cores with each activation
// split in two, ~22 bits of its 24). With exact numerics (kernels/exact.h) every step follows the CPU
// engine's exact mode to the bit instead. The token embedding stays in host memory (as llama.cpp keeps
// token_embd on the CPU): a forward pass uploads the rows it needs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace bioquant {

class Model;
class ThreadPool;
class KVCache;
struct DecodeSegment;

// Number of usable CUDA devices (0 when built without CUDA or when none is present).
int cuda_device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)"; throws Error for a bad index.
std::string cuda_device_description(int device);
// Parses "cuda" / "cuda:N" (returns N, 0 for "cuda"); -1 for "cpu"; throws Error for anything else
// or for a CUDA device that is not there.
int parse_device(const std::string& device);
// The name alone, without asking the driver (so without initialising CUDA, as a process that will
// fork workers must not): the same values and the same error for a malformed name.
int parse_device_name(const std::string& device);

// Device-to-device copy bandwidth in GB/s (bytes read + bytes written, best of 5 over 1 GiB): the
// ceiling a weight-streaming decode step is measured against.
double cuda_copy_bandwidth(int device);

struct GpuMemory {
  size_t weights = 0;     // matrices as uploaded (quantized formats stay quantized) + norms/biases
  size_t kv_cache = 0;    // every KV cache allocated so far
  size_t workspace = 0;   // activations, logits, scratch
  size_t peak_allocated = 0;  // our allocations, at their highest
  size_t device_used_peak = 0;  // total - free (cudaMemGetInfo) at its highest: includes the context
  size_t device_total = 0;
  size_t device_used_at_start = 0;  // total - free once the decoder had its context and cuBLAS, before any allocation
};

// Treat every CUDA device as having at most `bytes` of memory (0: its own): an allocation that would
// take the device's use (cudaMemGetInfo, the CUDA context included) past it fails with an error, and
// long prompts go through in rounds that fit. Lets a larger card show what fits a smaller one.
void set_cuda_memory_limit(size_t bytes);
size_t cuda_memory_limit();  // 0: none
// The device's memory in use now (total - free, cudaMemGetInfo); 0 without CUDA.
size_t cuda_memory_used(int device);

// Page-locked host memory (cudaHostAlloc, portable to every device) and its release; without CUDA
// the first throws. HostFloats is what callers use.
void* cuda_pinned_alloc(size_t bytes);
void cuda_pinned_free(void* p);

// Host floats for logits, page-locked when `pinned` (pass whether the decoder runs on a GPU), plain
// heap memory otherwise; zero-initialised. A GPU decode step copies logits straight into page-locked
// destinations, where other memory takes its pinned buffer and then a host copy (H200, 8B shape, tok/s,
// same call, pageable / page-locked: q4_k 1 sequence 528 / 544, 8: 1940 / 2121, 16: 2169 / 2538; nf4 16:
// 1984 / 2346). Page-locked memory is slow to allocate and taken from the host's: allocate once, reuse.
class HostFloats {
 public:
  HostFloats() = default;
  HostFloats(size_t n, bool pinned);
  ~HostFloats();
  HostFloats(HostFloats&& other) noexcept;
  HostFloats& operator=(HostFloats&& other) noexcept;
  HostFloats(const HostFloats&) = delete;
  HostFloats& operator=(const HostFloats&) = delete;

  float* data() { return data_; }
  const float* data() const { return data_; }
  size_t size() const { return size_; }
  float& operator[](size_t i) { return data_[i]; }
  const float& operator[](size_t i) const { return data_[i]; }
  bool pinned() const { return pinned_; }

 private:
  void release();
  float* data_ = nullptr;
  size_t size_ = 0;
  bool pinned_ = false;
};

// KV cache storage on the GPU: f32, bf16 (default), or q8: int8 with an fp16 scale per 32 values
// (8.5 bits, as llama.cpp's q8_0 cache; what lets a 70B model's 4096-token context fit beside 4-bit
// weights on a 40 GiB card).
enum class KvType { F32, BF16, Q8 };
// "f32", "bf16", "q8"; throws Error naming them otherwise.
KvType parse_kv_type(const std::string& name);

class GpuDecoder {
 public:
  // kv: storage of the KV caches this decoder allocates (bf16 halves their size).
  // exact: exact numerics (kernels/exact.h), the CPU engine's exact floats bit for bit; needs kv = F32.
  GpuDecoder(const Model& model, int device, KvType kv = KvType::BF16, bool exact = false);
  ~GpuDecoder();
  GpuDecoder(const GpuDecoder&) = delete;
  GpuDecoder& operator=(const GpuDecoder&) = delete;

  // As Decoder::forward: n tokens at positions cache.size() .. + n - 1 (the cache's K/V live on the
  // GPU, allocated at the cache's capacity on first use); logits of the last n_logits rows to host.
  // Does not advance cache.size(); the caller (Decoder) does.
  void forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits);
  // As Decoder::forward_batch (validated there): the sequences' rows are stacked through every
  // matmul, so a batch of decode steps reads the weights once; RoPE, K/V and attention run per
  // sequence. Does not advance the caches' sizes.
  void forward_batch(std::span<const DecodeSegment> segments);
  // Threads for a step's host side (a long prompt's embedding rows, dequantized on the host: 6 us a
  // q6_k row of 4096, 3 ms of a 512-token prompt); without a pool, or for a few rows, this thread alone.
  void set_host_pool(ThreadPool* pool);
  // Most tokens of one sequence in one step of these segments (0: no limit): Decoder splits longer
  // prompts into rounds of this many. BIOQUANT_CUDA_PROMPT_CHUNK chooses it; otherwise, under a memory
  // limit (set_cuda_memory_limit), the largest that fits what the limit leaves.
  int64_t prompt_chunk(std::span<const DecodeSegment> segments);
  // As Decoder::copy_prefix (validated there): the first n positions of from's K/V into to's,
  // device to device.
  void copy_prefix(const KVCache& from, const KVCache& to, int64_t n);
  // Frees the GPU K/V of a cache that is going away.
  void release(const KVCache& cache);

  GpuMemory memory() const;
  int device() const;
  // How batches of prompt tokens are multiplied (cuBLAS on tensor cores, or why not).
  std::string prompt_matmuls() const;
  // Batches of at least this many tokens multiply on tensor cores: weights dequantized to bf16,
  // activations rounded to bf16, f32 accumulation (what HF transformers + bitsandbytes compute);
  // shorter ones (decode) use the integer kernels. 0: never (no cuBLAS, or BIOQUANT_CUDA_GEMM=0).
  int64_t prompt_gemm_tokens() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace bioquant
