// Traits table, argument checks and dispatch for the quantized formats.
#include <atomic>
#include "bioquant/quant/quant.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace bioquant {
namespace {

constexpr QuantTraits kTraits[kQuantTypeCount] = {
    {QuantType::F32, "f32", 1, 4, 0},
    {QuantType::F16, "f16", 1, 2, 1},
    {QuantType::BF16, "bf16", 1, 2, 30},
    {QuantType::Q8_0, "q8_0", kQK, sizeof(BlockQ8_0), 8},
    {QuantType::Q4_0, "q4_0", kQK, sizeof(BlockQ4_0), 2},
    {QuantType::Q4_K, "q4_k", kQKK, sizeof(BlockQ4_K), 12},
    {QuantType::Q5_K, "q5_k", kQKK, sizeof(BlockQ5_K), 13},
    {QuantType::Q6_K, "q6_k", kQKK, sizeof(BlockQ6_K), 14},
    {QuantType::INT8, "int8", 0, 0, -1},
    {QuantType::NF4, "nf4", kBnbBlock, 4 + kBnbBlock / 2, -1},
    {QuantType::FP4, "fp4", kBnbBlock, 4 + kBnbBlock / 2, -1},
};

bool is_plain(QuantType t) { return t == QuantType::F32 || t == QuantType::F16 || t == QuantType::BF16; }
bool is_bnb4(QuantType t) { return t == QuantType::NF4 || t == QuantType::FP4; }

bool cpu_has_avx512_vnni() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

const CpuKernels* plain_kernels_for(const char* isa) {
  for (const CpuKernels* k : available_cpu_kernels()) {
    if (std::strcmp(k->isa, isa) == 0) return k;
  }
  return nullptr;
}

void check_gemm_args(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                     int64_t row_end, float* y, int64_t ldy) {
  check(n_tokens >= 0, "quant_gemm: negative token count");
  check(0 <= row_begin && row_begin <= row_end && row_end <= w.rows, "quant_gemm: row range outside the matrix");
  check(w.cols > 0 && ldx >= w.cols && ldy >= row_end, "quant_gemm: bad leading dimensions");
  check(quant_fits(w.type, w.cols), std::string("quant_gemm: ") + quant_traits(w.type).name + " cannot hold rows of " +
                                        std::to_string(w.cols) + " columns");
  check(!w.double_quant || is_bnb4(w.type), "quant_gemm: double_quant applies to nf4/fp4 only");
  check(w.row_bytes >= quant_row_bytes(w.type, w.cols, w.double_quant), "quant_gemm: row_bytes smaller than a row");
  check((w.data != nullptr && x != nullptr && y != nullptr) || n_tokens == 0 || row_begin == row_end,
        "quant_gemm: null pointer");
}

// Runs one ISA's kernel (isa is one of "scalar", "avx2", "avx512" and available).
void run_isa(const char* isa, const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
             int64_t row_end, float* y, int64_t ldy, uint64_t x_key = 0) {
  if (n_tokens == 0 || row_begin == row_end) return;
  if (is_plain(w.type)) {
    const CpuKernels* k = plain_kernels_for(isa);
    // avx512 quant kernels need VNNI, the plain ones do not; both tables agree on availability
    // except on AVX-512 CPUs without VNNI, where "avx512" is refused before we get here.
    if (k == nullptr) k = &cpu_kernels();
    const GemmFn fn = w.type == QuantType::F32 ? k->gemm_f32 : w.type == QuantType::F16 ? k->gemm_f16 : k->gemm_bf16;
    fn(x, ldx, n_tokens, w.data, w.row_bytes, w.cols, row_begin, row_end, y, ldy);
    return;
  }
  if (std::strcmp(isa, "avx512") == 0) return detail::qgemm_avx512(x, ldx, n_tokens, w, row_begin, row_end, y, ldy, x_key);
  if (std::strcmp(isa, "avx2") == 0) return detail::qgemm_avx2(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  detail::qgemm_scalar(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
}

bool isa_available(const char* isa) {
  if (std::strcmp(isa, "scalar") == 0) return true;
  if (std::strcmp(isa, "avx2") == 0) return cpu_has_avx2();
  if (std::strcmp(isa, "avx512") == 0) return cpu_has_avx512_vnni();
  return false;
}

const char* choose_isa() {
  // Follow the plain kernels' choice (BIOQUANT_CPU_ISA honoured there); an AVX-512 CPU without
  // VNNI runs the AVX2 quant kernels.
  const char* plain = cpu_kernels().isa;
  if (std::strcmp(plain, "avx512") == 0) return cpu_has_avx512_vnni() ? "avx512" : "avx2";
  return std::strcmp(plain, "avx2") == 0 ? "avx2" : "scalar";
}

}  // namespace

const QuantTraits& quant_traits(QuantType t) {
  const auto i = static_cast<size_t>(t);
  check(i < static_cast<size_t>(kQuantTypeCount), "quant_traits: unknown quant type");
  return kTraits[i];
}

std::optional<QuantType> parse_quant_type(std::string_view name) {
  for (const QuantTraits& tr : kTraits) {
    const std::string_view n(tr.name);
    if (n.size() != name.size()) continue;
    bool same = true;
    for (size_t i = 0; i < n.size() && same; ++i) {
      same = std::tolower(static_cast<unsigned char>(name[i])) == n[i];
    }
    if (same) return tr.type;
  }
  return std::nullopt;
}

bool quant_fits(QuantType t, int64_t cols) {
  const QuantTraits& tr = quant_traits(t);
  if (cols <= 0) return false;
  return tr.block_elems == 0 || cols % tr.block_elems == 0;
}

size_t quant_row_bytes(QuantType t, int64_t cols, bool double_quant) {
  const QuantTraits& tr = quant_traits(t);
  check(quant_fits(t, cols), std::string(tr.name) + " rows need a positive multiple of " +
                                 std::to_string(tr.block_elems) + " columns, got " + std::to_string(cols));
  check(!double_quant || is_bnb4(t), std::string("double quantization applies to nf4/fp4, not ") + tr.name);
  const auto c = static_cast<size_t>(cols);
  if (t == QuantType::INT8) return 4 + c;
  if (is_bnb4(t) && double_quant) {
    const size_t nb = c / kBnbBlock;
    return 4 + 4 * ((nb + kBnbNested - 1) / kBnbNested) + 33 * nb;
  }
  return c / static_cast<size_t>(tr.block_elems) * static_cast<size_t>(tr.block_bytes);
}

void quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out, bool double_quant) {
  quant_row_bytes(t, cols, double_quant);  // validates
  switch (t) {
    case QuantType::F32: std::memcpy(out, x, static_cast<size_t>(cols) * 4); return;
    case QuantType::F16:
    case QuantType::BF16:
      for (int64_t i = 0; i < cols; ++i) {
        const uint16_t h = t == QuantType::F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case QuantType::INT8:
    case QuantType::NF4:
    case QuantType::FP4: detail::bnb_quantize_row(t, x, cols, out, double_quant); return;
    default: detail::ggml_quantize_row(t, x, cols, out); return;
  }
}

void dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out, bool double_quant) {
  quant_row_bytes(t, cols, double_quant);  // validates
  switch (t) {
    case QuantType::F32: std::memcpy(out, in, static_cast<size_t>(cols) * 4); return;
    case QuantType::F16:
    case QuantType::BF16:
      for (int64_t i = 0; i < cols; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = t == QuantType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    case QuantType::INT8:
    case QuantType::NF4:
    case QuantType::FP4: detail::bnb_dequantize_row(t, in, cols, out, double_quant); return;
    default: detail::ggml_dequantize_row(t, in, cols, out); return;
  }
}

const char* quant_gemm_isa_name() {
  static const char* const isa = choose_isa();
  return isa;
}

void quant_gemm(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin, int64_t row_end,
                float* y, int64_t ldy) {
  check_gemm_args(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  run_isa(quant_gemm_isa_name(), x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
}

void quant_gemm_chunk(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                      int64_t row_end, float* y, int64_t ldy, uint64_t x_key) {
  check_gemm_args(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  run_isa(quant_gemm_isa_name(), x, ldx, n_tokens, w, row_begin, row_end, y, ldy, x_key);
}

uint64_t new_activation_key() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

void quant_gemm_reference(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy) {
  check_gemm_args(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  run_isa("scalar", x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
}

bool quant_gemm_isa(const char* isa, const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w,
                    int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  if (isa == nullptr || !isa_available(isa)) return false;
  check_gemm_args(x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  run_isa(isa, x, ldx, n_tokens, w, row_begin, row_end, y, ldy);
  return true;
}

namespace detail {

void* qgemm_scratch(int slot, size_t bytes) {
  struct Buffer {
    std::unique_ptr<uint8_t[]> mem;
    size_t size = 0;
  };
  thread_local Buffer buffers[8];
  check(slot >= 0 && slot < 8, "qgemm_scratch: bad slot");
  Buffer& b = buffers[slot];
  if (b.size < bytes + 64) {
    const size_t size = (bytes + 64) * 5 / 4 + 4096;
    b.mem.reset(new uint8_t[size]);
    b.size = size;
  }
  const auto addr = reinterpret_cast<uintptr_t>(b.mem.get());
  return b.mem.get() + ((64 - addr % 64) % 64);
}

}  // namespace detail
}  // namespace bioquant
