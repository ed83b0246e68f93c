// bitsandbytes formats (int8, nf4, fp4): scalar reference quantizers and dequantizers.
//
// Layouts (rows self-contained):
//   int8  [f32 absmax][int8 x cols]; q = round-half-even(w * (127 / absmax)) as bitsandbytes'
//         int8_vectorwise_quant (torch.round / __float2int_rn); w = q * absmax / 127.
//   nf4, fp4, no double quant: per 64-block [f32 absmax][32 bytes], element 2k in the HIGH nibble
//         of byte k, 2k+1 in the low nibble; 4.5 bits per weight. w = codebook[code] * absmax.
//   nf4, fp4, double quant: [f32 offset][f32 nested_absmax x ceil(nblocks/256)] then per block
//         [u8 absmax code][32 bytes]; absmax = dynamic_map[code] * nested_absmax[block/256] + offset,
//         offset = mean of the row's block absmaxes. 4.125 bits per weight plus 32 + 32/256 bits per
//         row and block group (4.13 for 4096 columns). bitsandbytes nests over the flattened tensor;
//         here the nesting is row-local so rows stay independent.
// Codes: nf4/fp4 use bitsandbytes' kernel decision trees (dQuantizeNF4 / dQuantizeFP4): the pivots
// are the midpoints between neighbouring codebook values and every comparison is strict `>`, so a
// value exactly on a midpoint takes the code of smaller value (fp4: smaller magnitude; the sign is
// taken from x < 0, so -0.0 gets +0). The value normalised is w * (1/absmax), as the kernel does.
// The 8-bit absmax code is the nearest dynamic-map entry to (absmax - offset) * (1/nested_absmax),
// ties to the lower code (bitsandbytes' dQuantize agrees except in rare tie/ordering corner cases).
// A block (or row, or nested group) whose absmax is 0 stores scale 0 and codes for 0.0.
#include <cmath>
#include <cstring>

#include "bioquant/core/error.h"
#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

constexpr float kNf4[16] = {-1.0f,
                            -0.6961928009986877f,
                            -0.5250730514526367f,
                            -0.39491748809814453f,
                            -0.28444138169288635f,
                            -0.18477343022823334f,
                            -0.09105003625154495f,
                            0.0f,
                            0.07958029955625534f,
                            0.16093020141124725f,
                            0.24611230194568634f,
                            0.33791524171829224f,
                            0.44070982933044434f,
                            0.5626170039176941f,
                            0.7229568362236023f,
                            1.0f};

// Index bits: sign | 2 exponent | 1 mantissa (bitsandbytes dDequantizeFP4Tree; 0b1000 is -0).
constexpr float kFp4[16] = {0.0f,         5.208333333e-03f,  0.66666667f,  1.0f,  0.33333333f,  0.5f,  0.16666667f,  0.25f,
                            -0.0f,        -5.208333333e-03f, -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f};

// bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i in 0..6,
// the 2^i midpoints of torch.linspace(0.1, 1, 2^i + 1, float32), times +-10^(i-6), plus 0 and 1,
// sorted. The float32 values are those torch 2.11 computes on x86 with its AVX2/AVX-512 kernels
// (linspace's first half as fma(step, i, start)); torch's non-SIMD "DEFAULT" kernel differs in the
// last bit of 42 entries. Checkpoints carry the map they were made with (nested_quant_map).
constexpr float kDynamicMap[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f,
    -0x1.df999ap-1f, -0x1.d86666p-1f, -0x1.d13334p-1f, -0x1.cap-1f,
    -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f,
    -0x1.893334p-1f, -0x1.82p-1f, -0x1.7accccp-1f, -0x1.73999ap-1f,
    -0x1.6c6668p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486668p-1f, -0x1.413334p-1f, -0x1.3ap-1f,
    -0x1.32ccccp-1f, -0x1.2b999ap-1f, -0x1.246668p-1f, -0x1.1d3334p-1f,
    -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.079998p-1f, -0x1.006666p-1f,
    -0x1.f26664p-2f, -0x1.e4p-2f, -0x1.d59998p-2f, -0x1.c73334p-2f,
    -0x1.b8ccccp-2f, -0x1.aa6666p-2f, -0x1.9cp-2f, -0x1.8d9998p-2f,
    -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.459998p-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6668p-2f,
    -0x1.0cp-2f, -0x1.fb3332p-3f, -0x1.de6666p-3f, -0x1.c1999ap-3f,
    -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66668p-4f,
    -0x1.93d70ap-4f, -0x1.8851eep-4f, -0x1.7ccccep-4f, -0x1.7147aep-4f,
    -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb854p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d6p-4f, -0x1.151ebap-4f,
    -0x1.09999ap-4f, -0x1.fc28f6p-5f, -0x1.e51ebap-5f, -0x1.ce147ap-5f,
    -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae146p-5f, -0x1.43d70ap-5f, -0x1.2ccccep-5f, -0x1.15c29p-5f,
    -0x1.fd70a4p-6f, -0x1.cf5c2ap-6f, -0x1.a147aep-6f, -0x1.733334p-6f,
    -0x1.451ebap-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c083p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f,
    -0x1.e978d4p-8f, -0x1.c49ba6p-8f, -0x1.9fbe76p-8f, -0x1.7ae148p-8f,
    -0x1.56041ap-8f, -0x1.3126e8p-8f, -0x1.0c49bap-8f, -0x1.ced914p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3ap-10f,
    -0x1.eecbfep-11f, -0x1.b3d07cp-11f, -0x1.78d5p-11f, -0x1.3dd982p-11f,
    -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f,
    -0x1.040bfep-17f, -0x1.b43528p-19f, -0x1.27476ep-21f, 0.0f,
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae16p-13f,
    0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced914p-9f,
    0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c083p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f,
    0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2ccccep-5f, 0x1.43d70ap-5f, 0x1.5ae146p-5f, 0x1.71eb86p-5f,
    0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f,
    0x1.20a3d6p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f,
    0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f,
    0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.459998p-2f, 0x1.54p-2f,
    0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d59998p-2f, 0x1.e4p-2f, 0x1.f26664p-2f, 0x1.006666p-1f,
    0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486668p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f,
    0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f,
    0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1.0p+0f,
};

uint8_t nf4_code(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 0b1111 : 0b1110;
      return x > 0.5016634166240692f ? 0b1101 : 0b1100;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 0b1011 : 0b1010;
    return x > 0.1202552504837513f ? 0b1001 : 0b1000;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 0b0111 : 0b0110;
    return x > -0.23460740596055984f ? 0b0101 : 0b0100;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 0b0011 : 0b0010;
  return x > -0.8480964004993439f ? 0b0001 : 0b0000;
}

uint8_t fp4_code(float x) {
  const uint8_t sign = x < 0 ? 0b1000 : 0b0000;
  x = std::fabs(x);
  uint8_t code;
  if (x > 0.29166667f) {
    if (x > 0.583333f) code = x > 0.8333333f ? 0b0011 : 0b0010;
    else code = x > 0.4166667f ? 0b0101 : 0b0100;
  } else {
    if (x > 0.0859375f) code = x > 0.20833333f ? 0b0111 : 0b0110;
    else code = x > 0.00260417f ? 0b0001 : 0b0000;
  }
  return static_cast<uint8_t>(code | sign);
}

// Nearest dynamic-map entry (ties to the lower code); the map is ascending.
uint8_t dynamic_code(float v) {
  int lo = 0, hi = 255;
  if (v <= kDynamicMap[0]) return 0;
  if (v >= kDynamicMap[255]) return 255;
  while (hi - lo > 1) {  // invariant: map[lo] < v <= map[hi]
    const int mid = (lo + hi) / 2;
    if (kDynamicMap[mid] < v) lo = mid;
    else hi = mid;
  }
  return static_cast<uint8_t>(v - kDynamicMap[lo] <= kDynamicMap[hi] - v ? lo : hi);
}

float read_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
void write_f32(uint8_t* p, float v) { std::memcpy(p, &v, sizeof v); }

// 4-bit codes of one 64-block: element 2k high nibble, 2k+1 low nibble.
void pack_block(QuantType t, const float* x, float absmax, uint8_t* q) {
  const float inv = absmax != 0.0f ? 1.0f / absmax : 0.0f;
  for (int k = 0; k < 32; ++k) {
    const float a = x[2 * k] * inv, b = x[2 * k + 1] * inv;
    const uint8_t ca = t == QuantType::NF4 ? nf4_code(a) : fp4_code(a);
    const uint8_t cb = t == QuantType::NF4 ? nf4_code(b) : fp4_code(b);
    q[k] = static_cast<uint8_t>(ca << 4 | cb);
  }
}

void unpack_block(const float* codebook, const uint8_t* q, float absmax, float* y) {
  for (int k = 0; k < 32; ++k) {
    y[2 * k] = codebook[q[k] >> 4] * absmax;
    y[2 * k + 1] = codebook[q[k] & 0x0F] * absmax;
  }
}

float block_absmax(const float* x, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
  return amax;
}

}  // namespace

const float* nf4_codebook() { return kNf4; }
const float* fp4_codebook() { return kFp4; }
const float* bnb_dynamic_map() { return kDynamicMap; }
void bnb_codebook_q14(QuantType t, int16_t* out) {
  const float* cb = t == QuantType::NF4 ? kNf4 : kFp4;
  for (int i = 0; i < 16; ++i) out[i] = static_cast<int16_t>(std::nearbyint(cb[i] * 16384.0f));  // |v| <= 16384: exact product
}

namespace detail {

void bnb_quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out, bool double_quant) {
  if (t == QuantType::INT8) {
    const float absmax = block_absmax(x, cols);
    write_f32(out, absmax);
    const float scale = absmax != 0.0f ? 127.0f / absmax : 0.0f;
    int8_t* q = reinterpret_cast<int8_t*>(out + 4);
    for (int64_t i = 0; i < cols; ++i) q[i] = static_cast<int8_t>(std::nearbyint(x[i] * scale));
    return;
  }
  check(t == QuantType::NF4 || t == QuantType::FP4, "bnb_quantize_row: not a bitsandbytes format");
  const int64_t nb = cols / kBnbBlock;
  if (!double_quant) {
    for (int64_t b = 0; b < nb; ++b, x += kBnbBlock, out += 36) {
      const float absmax = block_absmax(x, kBnbBlock);
      write_f32(out, absmax);
      pack_block(t, x, absmax, out + 4);
    }
    return;
  }
  // Double quantization: block absmaxes -> offset + 8-bit codes per group of 256 blocks.
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  uint8_t* blocks = out + 4 + 4 * ngroups;
  double sum = 0.0;
  for (int64_t b = 0; b < nb; ++b) sum += block_absmax(x + b * kBnbBlock, kBnbBlock);
  const float offset = static_cast<float>(sum / static_cast<double>(nb));
  write_f32(out, offset);
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t b0 = g * kBnbNested, b1 = b0 + kBnbNested < nb ? b0 + kBnbNested : nb;
    float nested = 0.0f;
    for (int64_t b = b0; b < b1; ++b) nested = std::fmax(nested, std::fabs(block_absmax(x + b * kBnbBlock, kBnbBlock) - offset));
    write_f32(out + 4 + 4 * g, nested);
    const float inv = nested != 0.0f ? 1.0f / nested : 0.0f;
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x + b * kBnbBlock;
      const float absmax = block_absmax(xb, kBnbBlock);
      uint8_t* blk = blocks + 33 * b;
      blk[0] = dynamic_code((absmax - offset) * inv);
      // As bitsandbytes: the 4-bit codes come from the exact absmax (the same codes as without
      // double quantization); only the stored scale is approximate.
      pack_block(t, xb, absmax, blk + 1);
    }
  }
}

void bnb_dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out, bool double_quant) {
  if (t == QuantType::INT8) {
    const float absmax = read_f32(in);
    const int8_t* q = reinterpret_cast<const int8_t*>(in + 4);
    for (int64_t i = 0; i < cols; ++i) out[i] = static_cast<float>(q[i]) * absmax / 127.0f;
    return;
  }
  check(t == QuantType::NF4 || t == QuantType::FP4, "bnb_dequantize_row: not a bitsandbytes format");
  const float* codebook = t == QuantType::NF4 ? kNf4 : kFp4;
  const int64_t nb = cols / kBnbBlock;
  if (!double_quant) {
    for (int64_t b = 0; b < nb; ++b, in += 36, out += kBnbBlock) unpack_block(codebook, in + 4, read_f32(in), out);
    return;
  }
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  const float offset = read_f32(in);
  const uint8_t* blocks = in + 4 + 4 * ngroups;
  for (int64_t b = 0; b < nb; ++b, out += kBnbBlock) {
    const float nested = read_f32(in + 4 + 4 * (b / kBnbNested));
    const uint8_t* blk = blocks + 33 * b;
    unpack_block(codebook, blk + 1, kDynamicMap[blk[0]] * nested + offset, out);
  }
}

}  // namespace detail
}  // namespace bioquant
