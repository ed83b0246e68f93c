#include "bioquant/kernels/cpu/ops.h"

#include <algorithm>
#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/model/config.h"

namespace bioquant {

void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* o = out + r * n;
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float scale = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(n)) + eps);
    for (int64_t i = 0; i < n; ++i) o[i] = xr[i] * scale * w[i];
  }
}

bool rope_long_step(const RopeParams& p, int64_t last_pos) {
  return p.type == RopeType::LongRope && last_pos + 1 > p.original_max_positions;
}

double longrope_attention_factor(double scale, double original) {
  return scale <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(scale) / std::log(original));
}

double yarn_mscale(double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

void rope_inv_freq(const RopeParams& p, int64_t rotary_dim, float* inv_freq, bool long_factors) {
  const int64_t half = rotary_dim / 2;
  if (p.type == RopeType::LongRope) {  // as HF: 1 / (factor[i] * base ** (2i / dim)), in float32
    const std::vector<float>& f = long_factors ? p.long_factor : p.short_factor;
    check(static_cast<int64_t>(f.size()) == half, "longrope: the factor lists must hold rotary_dim / 2 values");
    for (int64_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
      inv_freq[i] = 1.0f / (f[static_cast<size_t>(i)] * std::pow(p.theta, exponent));
    }
    return;
  }
  for (int64_t i = 0; i < half; ++i) {
    // As HF computes it: base ** (2i / dim) in float32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    inv_freq[i] = 1.0f / std::pow(p.theta, exponent);
  }
  if (!p.freq_factors.empty()) {  // llama.cpp stores llama3-style scaling as explicit factors
    for (int64_t i = 0; i < half && i < static_cast<int64_t>(p.freq_factors.size()); ++i) inv_freq[i] /= p.freq_factors[static_cast<size_t>(i)];
    return;
  }
  if (p.type == RopeType::Yarn) {
    // As transformers computes it: the dimension whose wavelength turns `rotations` times over the
    // original context bounds a linear ramp; below it the frequencies are kept (extrapolated), above
    // it divided by the factor (interpolated), blended on the ramp. Products in float32, bounds in double.
    const double dim = static_cast<double>(rotary_dim), original = static_cast<double>(p.original_max_positions);
    const auto correction_dim = [&](double rotations) {
      return dim * std::log(original / (rotations * 2.0 * M_PI)) / (2.0 * std::log(static_cast<double>(p.theta)));
    };
    double low = correction_dim(p.beta_fast), high = correction_dim(p.beta_slow);
    if (p.yarn_truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, dim - 1.0);
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float pos_freq = std::pow(p.theta, static_cast<float>(2 * i) / static_cast<float>(rotary_dim));
      const float extrapolated = 1.0f / pos_freq, interpolated = 1.0f / (p.factor * pos_freq);
      const float ramp = std::clamp((static_cast<float>(i) - static_cast<float>(low)) / static_cast<float>(high - low), 0.0f, 1.0f);
      const float keep = 1.0f - ramp;
      inv_freq[i] = interpolated * (1.0f - keep) + extrapolated * keep;
    }
  } else if (p.type == RopeType::Linear) {
    for (int64_t i = 0; i < half; ++i) inv_freq[i] /= p.factor;
  } else if (p.type == RopeType::Llama3) {
    // Wavelength bands: long wavelengths are slowed by `factor`, short ones kept, the middle blended.
    const double old_ctx = static_cast<double>(p.original_max_positions);
    const double low_freq_wavelen = old_ctx / p.low_freq_factor;
    const double high_freq_wavelen = old_ctx / p.high_freq_factor;
    for (int64_t i = 0; i < half; ++i) {
      const double f = inv_freq[i];
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_freq_wavelen) {
        inv_freq[i] = static_cast<float>(f / p.factor);
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (old_ctx / wavelen - p.low_freq_factor) / (p.high_freq_factor - p.low_freq_factor);
        inv_freq[i] = static_cast<float>((1.0 - smooth) * f / p.factor + smooth * f);
      }
    }
  }
}

void rope_rotate(float* head, int64_t rotary_dim, const float* cos, const float* sin) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = head[i];
    const float x2 = head[i + half];
    head[i] = x1 * cos[i] - x2 * sin[i];
    head[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

void silu_mul(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

void gelu_tanh_mul(float* a, const float* b, int64_t n) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  for (int64_t i = 0; i < n; ++i) {
    const float x = a[i];
    a[i] = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * b[i];
  }
}

void softcap(float* x, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i] / cap) * cap;
}

void softmax(float* x, int64_t n) {
  const float m = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

void add_bias(float* y, const float* bias, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) y[r * n + i] += bias[i];
}

}  // namespace bioquant
