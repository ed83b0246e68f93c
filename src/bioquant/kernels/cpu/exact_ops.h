// The CPU side of exact numerics (kernels/exact.h): the decoder's steps in exact:: arithmetic and
// canonical summation order, one row at a time (results do not depend on threads or ISA). The CUDA
// backend's exact kernels compute the same floats.
#pragma once
#include <cstdint>

#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cpu/matmul.h"

namespace bioquant::exact {

// out = x * scale * w per row, scale from the row's sum of squares (in place allowed).
void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out);
// y [n_tokens, w.rows] = x w^T. Quantized formats: activations quantized per 32 columns, exact
// integer block sums, block terms summed in canonical order. Throws Error for LLM.int8's outlier
// decomposition (no exact form on the GPU).
void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool);
// cos/sin of position pos at each of the rotary frequencies, times scale (longrope's attention factor).
void rope_table(int64_t pos, const float* inv_freq, int64_t half, float scale, float* cos, float* sin);
void rope(float* head, int64_t rotary_dim, const float* cos, const float* sin);
// One query head over `len` cached positions (K/V rows kv_stride floats apart): scores, softcap,
// softmax, weighted sum of V. scores: scratch of len floats.
void attention_head(const float* q, const float* k, const float* v, int64_t kv_stride, int64_t len, int64_t head_dim,
                    float scale, float softcap, float* scores, float* out);
// a = act(a) * b (SiLU, or GELU with the tanh approximation).
void act_mul(float* a, const float* b, int64_t n, bool gelu);
void softcap(float* x, int64_t n, float cap);

}  // namespace bioquant::exact
