// bitsandbytes checkpoints -> BioQuant row storage. See bnb_checkpoint.h for the contract.
//
// The serialization, as confirmed in the sources (bitsandbytes-foundation/bitsandbytes main, 0.4x;
// huggingface/transformers 4.4x-5.x):
// - bitsandbytes/nn/modules.py, Linear4bit._save_to_state_dict: after weight (and bias) it writes
//   every item of weight.quant_state.as_dict(packed=True) as `prefix + "weight." + k`.
// - bitsandbytes/functional.py, QuantState.as_dict(packed=True): tensors "absmax", "quant_map"
//   (= QuantState.code, the 16-entry 4-bit codebook) and, when nested, "nested_absmax" (state2.absmax),
//   "nested_quant_map" (state2.code); the non-tensors {quant_type, blocksize, dtype (str(torch dtype)
//   without "torch."), shape (tuple), nested_blocksize, nested_dtype, nested_offset (offset.item())}
//   go through bitsandbytes/utils.py pack_dict_to_tensor (json.dumps -> UTF-8 -> torch.uint8 1-D)
//   under the key "quant_state.bitsandbytes__" + quant_type.
// - functional.py quantize_4bit: blocksize 64 (128 only on ROCm); the op returns the packed codes as
//   [(n + 1) // (itemsize(quant_storage) * 2), 1] of quant_storage (uint8 by default) and absmax
//   f32 [ceil(n / blocksize)] (backends/cuda/ops.py); code = get_4bit_type(quant_type) (nf4: the
//   16 QLoRA values; fp4: [0, .0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12). With compress_statistics:
//   offset = absmax.mean(); quantize_blockwise(absmax - offset, blocksize=256) with the default
//   code create_dynamic_map(signed=True) -> u8 codes + f32 absmax per 256 (state2).
// - csrc kQuantizeBlockwise: absmax[block] = max |x| over the block, the values are normalised as
//   x * (1.0f / absmax), packed with qvals[j] = code(x[2j]) << 4 | code(x[2j + 1]) (element 2k in the
//   HIGH nibble); dQuantizeNF4 / dQuantizeFP4 are decision trees on codebook midpoints, the 8-bit
//   path dQuantize is a 7-step binary search over the 256-entry map then a midpoint test.
// - Dequantization (functional.py dequantize_4bit / dequantize_blockwise): when nested,
//   absmax = dequantize_blockwise(absmax_u8, state2) (kernel: code[u8] * nested_absmax[i / 256], f32)
//   then absmax += offset (f32); the 4-bit kernel gives dDequantizeNF4(nibble) * absmax (fp4:
//   dDequantizeFP4Tree, the same products) in f32 and casts the output to quant_state.dtype.
//   from_dict reads nested_offset as torch.tensor(float(...)) -> f32.
// - 8-bit, Linear8bitLt._save_to_state_dict: weight = CB (int8 [out, in]), prefix + "SCB" (f32
//   row absmax), prefix + "weight_format" = torch.tensor(0, dtype=torch.uint8) (a 0-d tensor; utils.py
//   LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {row: 0, col32: 1, col_turing: 2, col_ampere: 3}, only row
//   is written now). Int8Params._quantize casts the weight to float16 and calls
//   int8_vectorwise_quant: SCB = row absmax, CB = __float2int_rn(x * (127 / absmax)).
//   int8_vectorwise_dequant: CB * SCB * (1/127).
// - transformers (quantizers/quantizer_bnb_4bit.py, integrations/bitsandbytes.py): replaces every
//   nn.Linear except lm_head (get_keys_to_not_convert) by Linear4bit / Linear8bitLt, forces
//   torch_dtype float16 when none is given, loads pre-quantized weights through
//   Params4bit.from_prequantized (requires the quant_state.bitsandbytes__* item), and stores the
//   config as config.json "quantization_config" (quant_method "bitsandbytes"; nothing to do here).
//
// Memory. bnb's nested absmax costs 8 bits per 64 weights plus an f32 per 256 blocks (4.127 bits per
// weight); BioQuant's double-quant layout nests per row, not over the flattened tensor, so bnb's
// codes cannot be reused as they are. Nested layers are therefore stored with the dequantized f32
// absmax: 4.5 bits per weight, the values bit-identical to what bnb computes.
#include "bioquant/io/bnb_checkpoint.h"

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "bioquant/core/error.h"

namespace bioquant {
namespace {

using nlohmann::json;

std::string shape_of(const TensorView& v) { return shape_string(v.shape); }

const TensorView* find_plain(const TensorSource& source, const std::string& name) {
  const TensorView* v = source.find(name);
  if (v != nullptr) {
    check(v->format.empty(), "bitsandbytes tensor '" + name + "' is stored in the quantized format '" + v->format +
                                 "', expected plain " + dtype_name(v->dtype));
  }
  return v;
}

const TensorView& require_part(const TensorSource& source, const std::string& name, const std::string& why) {
  const TensorView* v = find_plain(source, name);
  check(v != nullptr, "missing tensor '" + name + "' (" + why + ")");
  return *v;
}

// A 1-D tensor of `n` elements of `dtype`.
void expect_vector(const TensorView& v, DType dtype, int64_t n, const std::string& what) {
  check(v.dtype == dtype, "bitsandbytes tensor '" + v.name + "' has dtype " + dtype_name(v.dtype) + "; " + what +
                              " is " + dtype_name(dtype));
  check(v.shape.size() == 1 && v.shape[0] == n && v.nbytes == static_cast<size_t>(n) * dtype_size(dtype),
        "bitsandbytes tensor '" + v.name + "' has shape " + shape_of(v) + "; " + what + " needs [" + std::to_string(n) +
            "]");
}

float f32_at(const TensorView& v, int64_t i) {
  float x;
  std::memcpy(&x, v.data + 4 * i, 4);
  return x;
}

// Forces a float through memory so that no product is fused into a following add (bitsandbytes
// rounds the product and the sum separately).
float rounded(float x) {
  volatile float v = x;
  return v;
}

void write_f32(uint8_t* p, float x) { std::memcpy(p, &x, 4); }

ConvertedWeight allocate(QuantType type, int64_t rows, int64_t cols, const std::string& origin) {
  ConvertedWeight out;
  out.type = type;
  out.nbytes = static_cast<size_t>(rows) * quant_row_bytes(type, cols);
  out.bytes = std::make_unique<uint8_t[]>(out.nbytes);
  out.origin = origin;
  return out;
}

const json& field(const json& j, const char* key, const std::string& where) {
  check(j.contains(key), "bitsandbytes tensor '" + where + "': quant_state JSON lacks \"" + key + "\"");
  return j[key];
}

int64_t int_field(const json& j, const char* key, const std::string& where) {
  const json& f = field(j, key, where);
  check(f.is_number_integer(), "bitsandbytes tensor '" + where + "': quant_state \"" + key + "\" is " + f.dump() +
                                   ", expected an integer");
  return f.get<int64_t>();
}

std::string string_field(const json& j, const char* key, const std::string& where) {
  const json& f = field(j, key, where);
  check(f.is_string(), "bitsandbytes tensor '" + where + "': quant_state \"" + key + "\" is " + f.dump() +
                           ", expected a string");
  return f.get<std::string>();
}

ConvertedWeight convert_4bit(const TensorSource& source, const std::string& w, const std::string& qs_name, bool nf4,
                             int64_t rows, int64_t cols) {
  const char* type_name = nf4 ? "nf4" : "fp4";
  // The packed quant_state JSON.
  const TensorView& qs = require_part(source, qs_name, "bitsandbytes 4-bit quant_state");
  check(qs.dtype == DType::U8 && qs.shape.size() == 1 && qs.nbytes == static_cast<size_t>(qs.shape[0]),
        "bitsandbytes tensor '" + qs_name + "' has dtype " + dtype_name(qs.dtype) + " shape " + shape_of(qs) +
            "; a packed quant_state is 1-D U8 (UTF-8 JSON)");
  const json j = json::parse(qs.data, qs.data + qs.nbytes, nullptr, /*allow_exceptions=*/false);
  check(j.is_object(), "bitsandbytes tensor '" + qs_name + "' does not hold a JSON object");
  const std::string quant_type = string_field(j, "quant_type", qs_name);
  check(quant_type == type_name, "bitsandbytes tensor '" + qs_name + "': quant_type is \"" + quant_type +
                                     "\", its name says " + type_name);
  const int64_t blocksize = int_field(j, "blocksize", qs_name);
  check(blocksize == kBnbBlock, "bitsandbytes tensor '" + qs_name + "': blocksize " + std::to_string(blocksize) +
                                    " is not supported (BioQuant's nf4/fp4 use blocks of 64, bitsandbytes' default)");
  const std::string dtype = string_field(j, "dtype", qs_name);
  check(dtype == "float16" || dtype == "bfloat16" || dtype == "float32",
        "bitsandbytes tensor '" + qs_name + "': dtype \"" + dtype + "\" is not float16, bfloat16 or float32");
  const json& shape = field(j, "shape", qs_name);
  check(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() && shape[1].is_number_integer(),
        "bitsandbytes tensor '" + qs_name + "': quant_state shape " + shape.dump() + " is not [out, in]");
  check(shape[0].get<int64_t>() == rows && shape[1].get<int64_t>() == cols,
        "bitsandbytes tensor '" + qs_name + "': quant_state shape " + shape.dump() + ", config expects " +
            shape_string({rows, cols}));
  check(cols % kBnbBlock == 0, "bitsandbytes tensor '" + w + "': in-features " + std::to_string(cols) +
                                   " is not a multiple of 64, so bitsandbytes' 64-blocks span rows; BioQuant's " +
                                   type_name + " rows need whole blocks");

  const int64_t n = rows * cols, nblocks = n / kBnbBlock;
  // The packed codes: [(n + 1) / (2 * itemsize), 1] of the quant_storage dtype (uint8 by default).
  const TensorView& packed = require_part(source, w, "bitsandbytes 4-bit weight");
  check(packed.shape.size() == 2 && packed.shape[1] == 1 && packed.nbytes == static_cast<size_t>(n / 2),
        "bitsandbytes tensor '" + w + "' has shape " + shape_of(packed) + " (" + std::to_string(packed.nbytes) +
            " bytes); packed 4-bit codes of " + shape_string({rows, cols}) + " are [" +
            std::to_string(n / 2 / static_cast<int64_t>(dtype_size(packed.dtype))) + ", 1] " +
            dtype_name(packed.dtype) + " (" + std::to_string(n / 2) + " bytes)");

  // The codebook must be ours (bnb's kernels hard-code it; quant_map records it).
  const std::string qm_name = w + ".quant_map";
  const TensorView& qm = require_part(source, qm_name, "bitsandbytes 4-bit codebook");
  expect_vector(qm, DType::F32, 16, "a 4-bit quant_map");
  const float* codebook = nf4 ? nf4_codebook() : fp4_codebook();
  for (int i = 0; i < 16; ++i) {
    const float got = f32_at(qm, i);
    check(std::fabs(got - codebook[i]) <= 1e-7f,
          "bitsandbytes tensor '" + qm_name + "' is not the " + type_name + " codebook (entry " + std::to_string(i) +
              " is " + std::to_string(got) + ", " + type_name + " has " + std::to_string(codebook[i]) + ")");
  }

  // Nested ("double quant") or plain absmax; the JSON and the tensors must agree.
  const std::string am_name = w + ".absmax", na_name = w + ".nested_absmax", nq_name = w + ".nested_quant_map";
  const bool nested_tensors = source.find(na_name) != nullptr || source.find(nq_name) != nullptr;
  const bool nested_json = j.contains("nested_offset") || j.contains("nested_blocksize") || j.contains("nested_dtype");
  check(nested_tensors == nested_json,
        "bitsandbytes tensor '" + qs_name + "': quant_state " + (nested_json ? "describes" : "lacks") +
            " nested absmax but '" + na_name + "'/'" + nq_name + "' are " + (nested_tensors ? "present" : "missing"));
  const TensorView& am = require_part(source, am_name, "bitsandbytes 4-bit block absmax");
  std::vector<float> absmax(static_cast<size_t>(nblocks));
  if (!nested_json) {
    expect_vector(am, DType::F32, nblocks, "an absmax of one f32 per 64 weights");
    for (int64_t i = 0; i < nblocks; ++i) absmax[static_cast<size_t>(i)] = f32_at(am, i);
  } else {
    expect_vector(am, DType::U8, nblocks, "a nested absmax of one u8 code per 64 weights");
    const int64_t nbs = int_field(j, "nested_blocksize", qs_name);
    check(nbs > 0, "bitsandbytes tensor '" + qs_name + "': nested_blocksize " + std::to_string(nbs) + " is not positive");
    const std::string nested_dtype = string_field(j, "nested_dtype", qs_name);
    check(nested_dtype == "float32", "bitsandbytes tensor '" + qs_name + "': nested_dtype \"" + nested_dtype +
                                         "\" is not supported (bitsandbytes writes float32)");
    const json& off = field(j, "nested_offset", qs_name);
    check(off.is_number(), "bitsandbytes tensor '" + qs_name + "': nested_offset is " + off.dump() + ", expected a number");
    const float offset = static_cast<float>(off.get<double>());  // from_dict: torch.tensor(float(...)) -> f32
    check(std::isfinite(offset), "bitsandbytes tensor '" + qs_name + "': nested_offset is not finite");
    const TensorView& na = require_part(source, na_name, "bitsandbytes nested absmax");
    expect_vector(na, DType::F32, (nblocks + nbs - 1) / nbs, "one f32 per " + std::to_string(nbs) + " absmax codes");
    const TensorView& nq = require_part(source, nq_name, "bitsandbytes nested quant map");
    expect_vector(nq, DType::F32, 256, "an 8-bit quant map");
    for (int64_t i = 0; i < nblocks; ++i) {
      // dequantize_blockwise: code[u8] * nested_absmax[i / nbs] (f32), then absmax += offset (f32).
      const float scaled = rounded(f32_at(nq, am.data[i]) * f32_at(na, i / nbs));
      absmax[static_cast<size_t>(i)] = rounded(scaled + offset);
    }
  }
  for (int64_t i = 0; i < nblocks; ++i) {
    check(std::isfinite(absmax[static_cast<size_t>(i)]),
          "bitsandbytes tensor '" + am_name + "': block " + std::to_string(i) + " has a non-finite absmax");
  }

  ConvertedWeight out = allocate(nf4 ? QuantType::NF4 : QuantType::FP4, rows, cols,
                                 std::string("bitsandbytes ") + type_name + (nested_json ? " (nested absmax)" : ""));
  // Row r, block b is bnb block r * (cols / 64) + b: [f32 absmax][its 32 bytes as stored].
  const size_t block_bytes = 4 + kBnbBlock / 2;
  check(quant_row_bytes(out.type, cols) == static_cast<size_t>(cols / kBnbBlock) * block_bytes,
        "internal: nf4/fp4 row layout is not [f32 absmax][32 bytes] per 64-block");
  uint8_t* dst = out.bytes.get();
  for (int64_t g = 0; g < nblocks; ++g, dst += block_bytes) {
    write_f32(dst, absmax[static_cast<size_t>(g)]);
    std::memcpy(dst + 4, packed.data + g * (kBnbBlock / 2), kBnbBlock / 2);
  }
  return out;
}

ConvertedWeight convert_int8(const TensorSource& source, const std::string& w, const std::string& prefix, int64_t rows,
                             int64_t cols) {
  const TensorView& cb = require_part(source, w, "bitsandbytes int8 weight beside '" + prefix + ".SCB'");
  check(cb.dtype == DType::I8, "bitsandbytes tensor '" + w + "' has dtype " + dtype_name(cb.dtype) +
                                   "; an LLM.int8 weight (beside '" + prefix + ".SCB') is I8");
  check(cb.shape == std::vector<int64_t>{rows, cols},
        "bitsandbytes tensor '" + w + "' has shape " + shape_of(cb) + ", config expects " + shape_string({rows, cols}));
  const std::string scb_name = prefix + ".SCB";
  const TensorView& scb = require_part(source, scb_name, "bitsandbytes int8 row absmax");
  expect_vector(scb, DType::F32, rows, "the int8 row absmax (SCB)");
  const std::string fmt_name = prefix + ".weight_format";
  if (const TensorView* fmt = find_plain(source, fmt_name)) {
    check(fmt->dtype == DType::U8 && fmt->nbytes == 1, "bitsandbytes tensor '" + fmt_name + "' has dtype " +
                                                           dtype_name(fmt->dtype) + " shape " + shape_of(*fmt) +
                                                           "; expected one U8");
    check(fmt->data[0] == 0, "bitsandbytes tensor '" + fmt_name + "' is " + std::to_string(fmt->data[0]) +
                                 " (col32/col_turing/col_ampere tiles); only 0 = row-major is supported");
  }
  ConvertedWeight out = allocate(QuantType::INT8, rows, cols, "bitsandbytes int8");
  const size_t row_bytes = quant_row_bytes(QuantType::INT8, cols);
  check(row_bytes == 4 + static_cast<size_t>(cols), "internal: int8 row layout is not [f32 absmax][int8 x cols]");
  for (int64_t r = 0; r < rows; ++r) {
    const float s = f32_at(scb, r);
    check(std::isfinite(s) && s >= 0.0f,
          "bitsandbytes tensor '" + scb_name + "': row " + std::to_string(r) + " has absmax " + std::to_string(s));
    uint8_t* dst = out.bytes.get() + static_cast<size_t>(r) * row_bytes;
    write_f32(dst, s);
    std::memcpy(dst + 4, cb.data + r * cols, static_cast<size_t>(cols));
  }
  return out;
}

}  // namespace

std::optional<ConvertedWeight> convert_bnb_weight(const TensorSource& source, const std::string& weight_name,
                                                  int64_t rows, int64_t cols) {
  check(rows > 0 && cols > 0, "bitsandbytes tensor '" + weight_name + "': bad expected shape " +
                                  shape_string({rows, cols}));
  const std::string qs_nf4 = weight_name + ".quant_state.bitsandbytes__nf4";
  const std::string qs_fp4 = weight_name + ".quant_state.bitsandbytes__fp4";
  const bool has_nf4 = source.find(qs_nf4) != nullptr, has_fp4 = source.find(qs_fp4) != nullptr;
  check(!(has_nf4 && has_fp4), "bitsandbytes tensor '" + weight_name + "' has both an nf4 and an fp4 quant_state");
  if (has_nf4 || has_fp4) return convert_4bit(source, weight_name, has_nf4 ? qs_nf4 : qs_fp4, has_nf4, rows, cols);

  static const std::string kSuffix = ".weight";
  if (weight_name.size() > kSuffix.size() &&
      weight_name.compare(weight_name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0) {
    const std::string prefix = weight_name.substr(0, weight_name.size() - kSuffix.size());
    if (source.find(prefix + ".SCB") != nullptr) return convert_int8(source, weight_name, prefix, rows, cols);
    check(source.find(prefix + ".weight_format") == nullptr,
          "missing tensor '" + prefix + ".SCB' (bitsandbytes int8 row absmax beside '" + prefix + ".weight_format')");
  }
  for (const char* part : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"}) {
    check(source.find(weight_name + part) == nullptr,
          "missing tensor '" + qs_nf4 + "' (or __fp4): '" + weight_name + part +
              "' says the layer is bitsandbytes 4-bit, but its quant_state is not in the checkpoint");
  }
  return std::nullopt;
}

}  // namespace bioquant
