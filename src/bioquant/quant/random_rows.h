// Random weight rows made straight in a storage format, for synthetic real-size models: no float
// model is built and quantized, so a 70B shape in q4_k_m costs seconds, not hours. Each row comes
// from its own seed through code that compiles for the host and for CUDA, so the CPU engine and the
// GPU (which fills device memory itself, never holding the weights on the host) get the same bytes.
//
// Levels and codes are uniform random; scales are fixed per format so that weights have roughly
// the spread of U(-a, a) with a = 0.02 * sqrt(3) (std 0.02), as the float synthetic weights do.
#pragma once
#include <cstdint>
#include <cstring>

#include "bioquant/core/host_device.h"
#include "bioquant/quant/quant.h"

namespace bioquant::random_rows {

inline constexpr float kAmplitude = 0.034641016f;  // 0.02 * sqrt(3)

BQ_HOST_DEVICE inline uint64_t next(uint64_t& state) {  // splitmix64
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Seed of row r of the matrix with seed s.
BQ_HOST_DEVICE inline uint64_t row_seed(uint64_t matrix_seed, int64_t row) {
  uint64_t s = matrix_seed ^ (0xd1b54a32d192ed03ull * static_cast<uint64_t>(row + 1));
  return next(s);
}

BQ_HOST_DEVICE inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

// Round to nearest even, subnormals included (K-quant super-block scales often are subnormal).
BQ_HOST_DEVICE inline uint16_t f16_bits(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t e = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  if (e <= 0) {  // value = m24 * 2^(e - 38), subnormal mantissa = m24 >> (14 - e)
    const int32_t shift = 14 - e;
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t m24 = (u & 0x7FFFFFu) | 0x800000u;
    uint32_t h = m24 >> shift;
    const uint32_t rest = m24 & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);  // inf (NaN never occurs here)
  uint32_t m = u & 0x7FFFFFu;
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (m >> 13);
  const uint32_t rest = m & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

BQ_HOST_DEVICE inline uint16_t bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

BQ_HOST_DEVICE inline void put16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
BQ_HOST_DEVICE inline void put32(uint8_t* p, float f) {
  const uint32_t u = f32_bits(f);
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(u >> (8 * i));
}

// n random bytes; with signed_levels, bytes are int8 in [-127, 127] (no -128, as the quantizers).
BQ_HOST_DEVICE inline void random_bytes(uint64_t& state, uint8_t* out, int64_t n, bool signed_levels = false) {
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t r = next(state);
    for (int64_t k = i; k < i + 8 && k < n; ++k, r >>= 8) {
      uint8_t b = static_cast<uint8_t>(r);
      if (signed_levels && b == 0x80) b = 0x81;
      out[k] = b;
    }
  }
}

BQ_HOST_DEVICE inline float uniform(uint64_t& state) {  // [-a, a)
  return (static_cast<float>(next(state) >> 40) * (2.0f / 16777216.0f) - 1.0f) * kAmplitude;
}

// Writes row `row` of a matrix of type t (cols columns; quant_row_bytes(t, cols, dq) bytes).
BQ_HOST_DEVICE inline void make_row(QuantType t, bool dq, int64_t cols, uint64_t matrix_seed, int64_t row, uint8_t* out) {
  uint64_t s = row_seed(matrix_seed, row);
  const float a = kAmplitude;
  switch (t) {
    case QuantType::F32:
      for (int64_t i = 0; i < cols; ++i) put32(out + 4 * i, uniform(s));
      return;
    case QuantType::F16:
      for (int64_t i = 0; i < cols; ++i) put16(out + 2 * i, f16_bits(uniform(s)));
      return;
    case QuantType::BF16:
      for (int64_t i = 0; i < cols; ++i) put16(out + 2 * i, bf16_bits(uniform(s)));
      return;
    case QuantType::Q8_0:  // [f16 d][32 x int8]
      for (int64_t b = 0; b < cols / 32; ++b) {
        put16(out + 34 * b, f16_bits(a / 127.0f));
        random_bytes(s, out + 34 * b + 2, 32, true);
      }
      return;
    case QuantType::Q4_0:  // [f16 d][16 bytes], weight = d * (level - 8)
      for (int64_t b = 0; b < cols / 32; ++b) {
        put16(out + 18 * b, f16_bits(a / 8.0f));
        random_bytes(s, out + 18 * b + 2, 16);
      }
      return;
    case QuantType::Q4_K:  // [f16 d][f16 dmin][12 bytes of 6-bit scales/mins][128 bytes]
    case QuantType::Q5_K:  // ... [32 bytes fifth bits][128 bytes]
      for (int64_t b = 0; b < cols / 256; ++b) {
        const bool q5 = t == QuantType::Q5_K;
        uint8_t* blk = out + (q5 ? 176 : 144) * b;
        // weight = d * sc * level - dmin * m, sc and m uniform in 0..63, level in 0..15 (0..31)
        put16(blk, f16_bits(2.0f * a / ((q5 ? 31.0f : 15.0f) * 63.0f)));
        put16(blk + 2, f16_bits(a / 63.0f));
        random_bytes(s, blk + 4, q5 ? 172 : 140);
      }
      return;
    case QuantType::Q6_K:  // [128 ql][64 qh][16 x int8 scales][f16 d], weight = d * scale * (level - 32)
      for (int64_t b = 0; b < cols / 256; ++b) {
        uint8_t* blk = out + 210 * b;
        random_bytes(s, blk, 192);
        random_bytes(s, blk + 192, 16, true);
        put16(blk + 208, f16_bits(a / (32.0f * 64.0f)));
      }
      return;
    case QuantType::INT8:  // [f32 absmax][cols x int8]
      put32(out, a);
      random_bytes(s, out + 4, cols, true);
      return;
    case QuantType::NF4:
    case QuantType::FP4: {
      const int64_t nb = cols / 64;
      if (!dq) {  // [f32 absmax][32 code bytes] per block of 64
        for (int64_t b = 0; b < nb; ++b) {
          put32(out + 36 * b, a);
          random_bytes(s, out + 36 * b + 4, 32);
        }
        return;
      }
      // [f32 offset][f32 nested x groups][per block: u8 absmax code, 32 code bytes];
      // absmax = dynamic_map[code] * nested + offset, dynamic_map in [-1, 1].
      const int64_t groups = (nb + 255) / 256;
      put32(out, a);
      for (int64_t g = 0; g < groups; ++g) put32(out + 4 + 4 * g, 0.5f * a);
      random_bytes(s, out + 4 + 4 * groups, 33 * nb);
      return;
    }
  }
}

}  // namespace bioquant::random_rows
