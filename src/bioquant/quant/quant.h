// Quantized weight formats: one traits table, the block layouts, the scalar reference
// quantizers (the oracle), and the matmul over a stored weight matrix in any format.
//
// Formats (formats.md §2-3 is the byte-level contract):
//   f32, f16, bf16      plain rows (matmul forwards to cpu_kernels())
//   q8_0, q4_0          ggml blocks of 32 (fp16 d), byte-compatible with llama.cpp / GGUF
//   q4_k, q5_k, q6_k    ggml super-blocks of 256, byte-compatible with llama.cpp / GGUF
//   int8                LLM.int8 row-wise absmax: row = [f32 absmax][int8 x cols]
//   nf4, fp4            bitsandbytes 4-bit, blocks of 64: [f32 absmax][32 bytes, element 2k in the
//                       HIGH nibble]; with double_quant the row is
//                       [f32 offset][f32 nested_absmax x ceil(nblocks/256)][nblocks x ([u8 code][32 bytes])]
// Every row is self-contained (no data shared between rows), so callers may split rows freely.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace bioquant {

enum class QuantType : uint8_t { F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, INT8, NF4, FP4 };
inline constexpr int kQuantTypeCount = 11;

struct QuantTraits {
  QuantType type;
  const char* name;     // "f32","f16","bf16","q8_0","q4_0","q4_k","q5_k","q6_k","int8","nf4","fp4"
  int64_t block_elems;  // elements per block along a row (1 plain; 32; 256; 64 nf4/fp4; 0 = whole row, int8)
  int64_t block_bytes;  // bytes per block (int8: 0, see quant_row_bytes; nf4/fp4: without double quant)
  int32_t ggml_type;    // GGUF type id; -1 when the format is not a GGUF type (int8, nf4, fp4)
};

const QuantTraits& quant_traits(QuantType t);
// Accepts the names above, case-insensitive.
std::optional<QuantType> parse_quant_type(std::string_view name);
// Bytes of one stored row; throws Error when cols is not positive or not a multiple of the block
// (or when double_quant is asked of a format other than nf4/fp4).
size_t quant_row_bytes(QuantType t, int64_t cols, bool double_quant = false);
// cols > 0 and cols % block_elems == 0 (int8: any cols > 0).
bool quant_fits(QuantType t, int64_t cols);

// Scalar reference (the oracle): one row at a time. `out` must hold quant_row_bytes(t, cols, dq).
// q8_0/q4_0/q4_k/q5_k/q6_k follow llama.cpp's reference quantizers (quantize_row_*_ref), so files
// written here match what llama.cpp would write from the same floats (up to its fp16 rounding,
// which we do round-to-nearest-even like its F16C path).
void quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out, bool double_quant = false);
void dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out, bool double_quant = false);

// A stored weight matrix in any format; rows are row_bytes apart and self-contained.
struct WeightView {
  QuantType type = QuantType::F32;
  bool double_quant = false;  // nf4/fp4 only
  int64_t rows = 0, cols = 0;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
};

// y[t*ldy + o] = sum_k x[t*ldx + k] * W[o][k], for t < n_tokens and o in [row_begin, row_end).
// The fast kernel for this CPU (honours BIOQUANT_CPU_ISA like cpu_kernels()). Not threaded: the
// caller splits rows.
//
// Numerics. Every quantized format runs on integers: each call first quantizes the activations of
// every token to int8 in blocks of 32 (d = absmax/127, q = round-half-even(x/d) computed as
// x * (1/d); the last block of an int8 row may be shorter), then takes exact integer dot products
// per weight block and scales them in f32. This is llama.cpp's scheme (q8_0 activations) and costs
// at most 1/254 of each activation block's absmax per element. nf4/fp4 multiply the int8
// activations by their codebook in Q1.14 (round(codebook * 2^14), within 2^-15 of the f32
// codebook). f32/f16/bf16 forward to cpu_kernels() (f32 activations). Every ISA computes the same
// integers; only the f32 summation order differs.
void quant_gemm(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                int64_t row_end, float* y, int64_t ldy);
// quant_gemm for callers that split one matmul into many row chunks: every chunk of the matmul
// passes the same fresh key (new_activation_key()), and a thread that already prepared (quantized)
// these activations for an earlier chunk reuses them. Results equal quant_gemm's bit for bit.
void quant_gemm_chunk(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                      int64_t row_end, float* y, int64_t ldy, uint64_t x_key);
uint64_t new_activation_key();  // never 0
// The same through the scalar reference kernel (the oracle of the SIMD kernels).
void quant_gemm_reference(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy);
// The same through a named ISA ("scalar", "avx2", "avx512"); false (nothing written) when this CPU
// cannot run it. "avx512" needs AVX-512 F/BW/VL/DQ + VNNI.
bool quant_gemm_isa(const char* isa, const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w,
                    int64_t row_begin, int64_t row_end, float* y, int64_t ldy);
// The ISA quant_gemm uses in this process ("scalar", "avx2" or "avx512").
const char* quant_gemm_isa_name();

// GGUF formats BioQuant reads but does not compute in. It holds them in a wider format it does, with
// the very same weights (each element's value bit for bit): q5_0 as q8_0 (levels -16..15 under the
// block's fp16 scale), q3_k as q6_k (levels -4..3; each 16 elements' scale d * (s - 32), s - 32 being an
// int8 as q6_k's scales are). llama.cpp writes q3_k in its Q3_K_* files, and q5_0 where rows do not fill
// a 256-block (Qwen2.5-0.5B's 896-wide rows in its Q4_K_M file).
struct GgmlWidening {
  QuantType held;
  int64_t block_elems, block_bytes;  // of the format read
  double bits_per_weight;            // of the format read
};
std::optional<GgmlWidening> ggml_widening(std::string_view format);  // "q5_0", "q3_k"; else nothing
// Rewrites `rows` rows of `cols` (a multiple of the block) into the held format (quant_row_bytes each).
void widen_ggml_rows(std::string_view format, const uint8_t* in, int64_t rows, int64_t cols, uint8_t* out);
// Their values, as llama.cpp's dequantize_row_q5_0 / dequantize_row_q3_K compute them.
void dequantize_ggml_row(std::string_view format, const uint8_t* in, int64_t cols, float* out);

// Codebooks (16 floats, index = 4-bit code) and bitsandbytes' signed 8-bit dynamic map
// (create_dynamic_map(signed=True), 256 floats ascending; [127] = 0, [255] = 1).
const float* nf4_codebook();
const float* fp4_codebook();
const float* bnb_dynamic_map();
// The nf4/fp4 codebook in Q1.14, round-half-even(codebook * 16384): the integer levels every kernel
// (CPU, GPU, exact) multiplies int8 activations by; off by at most 2^-15 of the block absmax.
void bnb_codebook_q14(QuantType t, int16_t* out);

// ---- Block layouts (ggml-common.h, byte for byte). Scales are IEEE fp16 bit patterns. ----
inline constexpr int64_t kQK = 32;    // q8_0, q4_0 block
inline constexpr int64_t kQKK = 256;  // K-quant super-block
inline constexpr int64_t kBnbBlock = 64;
inline constexpr int64_t kBnbNested = 256;  // blocks per nested absmax (double quant)

struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];  // element j: low nibble of qs[j]; element j+16: high nibble
};
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12];  // 8 x (6-bit scale, 6-bit min), packed as in formats.md
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ8_0) == 34, "q8_0 block is 34 bytes");
static_assert(sizeof(BlockQ4_0) == 18, "q4_0 block is 18 bytes");
static_assert(sizeof(BlockQ4_K) == 144, "q4_k block is 144 bytes");
static_assert(sizeof(BlockQ5_K) == 176, "q5_k block is 176 bytes");
static_assert(sizeof(BlockQ6_K) == 210, "q6_k block is 210 bytes");

// Unpacks the 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K `scales[12]`. (The GPU kernels
// read the same bits from the header's words: kquant_scale_min_pair in kernels/cuda/block_decoders.cuh.)
inline void kquant_scale_min(const uint8_t* q, int j, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

namespace detail {
// Per-ISA entry points (one translation unit each, compiled with that ISA's flags). They assume
// validated arguments and a quantized type (not f32/f16/bf16).
void qgemm_scalar(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy);
void qgemm_avx2(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                int64_t row_end, float* y, int64_t ldy);
// x_key: 0, or a key under which this thread may reuse the activations it prepared last.
void qgemm_avx512(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy, uint64_t x_key = 0);
// Row codecs of the two format families (ggml_quants.cpp, bnb_quants.cpp); quant.cpp dispatches.
void ggml_quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out);
void ggml_dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out);
void bnb_quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out, bool double_quant);
void bnb_dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out, bool double_quant);
// Per-thread scratch that grows and is reused (compiled in the baseline unit, so no std container
// code is instantiated inside the ISA units). Slot 0..7; 64-byte aligned.
void* qgemm_scratch(int slot, size_t bytes);
}  // namespace detail

}  // namespace bioquant
