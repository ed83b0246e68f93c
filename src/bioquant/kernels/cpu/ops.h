// Element-wise and row-wise CPU operations of the decoder (f32).
#pragma once
#include <cstdint>

namespace bioquant {

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w, for `rows` rows of `n` (in place allowed).
void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out);

// Inverse frequencies of the rotated pairs (rotary_dim / 2 values). longrope: with its short factors, or
// with its long ones when `long_factors`.
struct RopeParams;
void rope_inv_freq(const RopeParams& p, int64_t rotary_dim, float* inv_freq, bool long_factors = false);
// Whether one sequence's step whose last position is last_pos rotates with longrope's long factors. As
// transformers decides it for each forward: when the step's largest position + 1 exceeds the original
// context (so a prompt past it takes them at every position, and cached positions keep theirs).
bool rope_long_step(const RopeParams& p, int64_t last_pos);
// The factors cos and sin are scaled by when a config does not give one, for a context `scale` times the
// original (both 1 when scale <= 1). longrope: sqrt(1 + ln(scale) / ln(original)). yarn: 0.1 m ln(scale) + 1.
double longrope_attention_factor(double scale, double original);
double yarn_mscale(double scale, double m = 1.0);

// HF "rotate_half" RoPE on one head vector: element i pairs with i + rotary_dim / 2;
// elements at and past rotary_dim are left alone.
void rope_rotate(float* head, int64_t rotary_dim, const float* cos, const float* sin);

// a[i] = act(a[i]) * b[i]
void silu_mul(float* a, const float* b, int64_t n);
void gelu_tanh_mul(float* a, const float* b, int64_t n);

// x = tanh(x / cap) * cap
void softcap(float* x, int64_t n, float cap);

// In-place softmax of n values.
void softmax(float* x, int64_t n);

void add_bias(float* y, const float* bias, int64_t rows, int64_t n);

}  // namespace bioquant
