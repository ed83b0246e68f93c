// What the CUDA backend allocates, from a model's shape alone: GpuDecoder allocates by these sizes and
// `bioquant estimate --device cuda` predicts by them, so the two cannot drift apart. Plain C++ (no CUDA
// types): the estimate works in builds without the CUDA backend.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>

#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/config.h"

namespace bioquant {

class Model;
struct Matrix;

// Steps of at most this many rows slice the fused residual-add + RMSNorm over blocks by columns.
constexpr int64_t kGpuSlicedNormRows = 16;
// Sequences of at least this many tokens in a step multiply on tensor cores (cuBLAS).
constexpr int64_t kGpuGemmMinTokens = 32;
// Decode attention: blocks per head at most, by default.
constexpr int kGpuMaxAttentionSplits = 16;
// Bytes after every matrix on the GPU (the block decoders' word loads may read 3 bytes past its end).
constexpr size_t kGpuMatrixTail = 16;

// Floats of each workspace buffer for steps of up to `tokens` rows and `logit_rows` logit rows (0:
// the buffer is not allocated; `normed` shares `attn` when the attention output is at least as wide).
struct GpuWorkSizes {
  int64_t x = 0, x2 = 0, h = 0, q = 0, k = 0, v = 0, attn = 0, normed = 0, gate = 0, up = 0, logits = 0;
  int64_t aq = 0, ad = 0, as = 0, pos = 0, attn_part = 0, attn_done = 0;  // aq: int8 values, in floats
  int64_t top = 0;  // int32 top token ids, one per logit row
  size_t bytes() const;
};
GpuWorkSizes gpu_work_sizes(const ModelConfig& c, int64_t tokens, int64_t logit_rows, int attention_splits);

// Blocks per decode attention head by default: about four blocks per SM over the heads.
int gpu_attention_splits(int sms, int n_heads);

// One KV cache of `capacity` positions: bytes of its K (and of its V) values and of their q8 scales.
void gpu_kv_sizes(const ModelConfig& c, int64_t capacity, KvType kv, size_t& values_bytes, size_t& scale_bytes);

// The weights as uploaded, in one allocation: every layer matrix and the output projection (the token
// embedding stays in host memory), each followed by kGpuMatrixTail bytes, and the f32 norms, biases and
// RoPE frequencies; each piece aligned to 256 bytes. matrix_bytes gives a matrix's stored bytes (its
// planned format's, for an estimate).
size_t gpu_weight_bytes(const Model& model, const std::function<size_t(const Matrix&)>& matrix_bytes);

// The size the two buffers a quantized matrix is dequantized into, tile by tile, for the tensor cores
// aim at (BIOQUANT_CUDA_TILE_MB overrides it in the decoder).
size_t gpu_gemm_tile_bytes(size_t model_weight_bytes);
// Rows of a rows x cols matrix per dequantized tile of about tile_bytes (bf16; at least 128 rows);
// when fewer than its rows, two tile buffers alternate.
int64_t gpu_gemm_tile_rows(int64_t rows, int64_t cols, size_t tile_bytes);

// Measured on an H100 80GB (CUDA 13, driver 580) before any allocation: the CUDA context with the
// per-thread stack the decoder sets (64 bytes), and the cuBLAS handle. Other cards differ by tens of MiB.
constexpr double kGpuContextBytes = 281.0 * 1024 * 1024;
constexpr double kGpuCublasBytes = 68.0 * 1024 * 1024;

}  // namespace bioquant
