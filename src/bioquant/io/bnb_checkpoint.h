// Pre-quantized bitsandbytes checkpoints (transformers' `save_pretrained` of a model loaded with
// `load_in_4bit` / `load_in_8bit`): detects a bnb-serialized linear weight and converts it, without
// requantizing, into BioQuant's int8 / nf4 / fp4 row storage (quant/quant.h).
//
// What transformers writes for a linear layer `<p>` (checked against the sources; see the .cpp):
//   4-bit  <p>.weight                           U8 [numel/2, 1]: the flattened row-major [out, in]
//                                               matrix, element 2k in the HIGH nibble of byte k
//          <p>.weight.absmax                    F32 [numel/64]; U8 codes when nested ("double quant")
//          <p>.weight.quant_map                 F32 [16]: the nf4 / fp4 codebook
//          <p>.weight.nested_absmax             F32 [ceil(n_absmax/256)]         (nested only)
//          <p>.weight.nested_quant_map          F32 [256]: the signed dynamic map (nested only)
//          <p>.weight.quant_state.bitsandbytes__nf4 (or __fp4): U8 bytes of the JSON
//              {quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset]}
//   8-bit  <p>.weight I8 [out, in] (CB), <p>.SCB F32 [out] (row absmax), <p>.weight_format U8 [] (0 = row)
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "bioquant/io/tensor_source.h"
#include "bioquant/quant/quant.h"

namespace bioquant {

// A weight matrix converted into BioQuant row storage: `rows` rows of quant_row_bytes(type, cols,
// double_quant) bytes each, back to back.
struct ConvertedWeight {
  QuantType type = QuantType::F32;
  bool double_quant = false;  // always false: nested bnb scales are dequantized into f32 absmax
  std::unique_ptr<uint8_t[]> bytes;
  size_t nbytes = 0;
  std::string origin;  // what the checkpoint held, e.g. "bitsandbytes nf4 (nested absmax)"
};

// `weight_name` is a linear layer's weight ("model.layers.0.mlp.up_proj.weight") and [rows, cols]
// the shape the config expects. Returns nullopt when the checkpoint holds that weight as plain
// floats (or in another quantized format), else the converted weight:
//   int8                     -> QuantType::INT8 rows [f32 SCB][int8 x cols], bytes copied as stored
//   nf4/fp4                  -> NF4/FP4 rows of 64-blocks [f32 absmax][32 bytes], codes copied as stored
//   nf4/fp4 nested absmax    -> the same, with each absmax dequantized exactly as bitsandbytes does
//                               (f32(f32(nested_quant_map[code] * nested_absmax[i / 256]) + offset))
// Every value then dequantizes to the f32 that bitsandbytes' kernels compute before their output
// cast to the layer dtype. 4-bit needs cols % 64 == 0 (bnb's blocks run over the flattened matrix;
// ours stay within a row). Throws Error (one line, naming the tensor) on anything malformed or
// inconsistent: missing parts, wrong dtypes/sizes, a shape other than [rows, cols], a codebook
// that is not nf4/fp4, a block size other than 64, a non-row int8 layout.
std::optional<ConvertedWeight> convert_bnb_weight(const TensorSource& source, const std::string& weight_name,
                                                  int64_t rows, int64_t cols);

}  // namespace bioquant
