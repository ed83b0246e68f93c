// Writes a (quantized) model as a GGUF v3 file in llama.cpp's layout: `{arch}.*` hyperparameters,
// llama.cpp tensor names, dims fastest-first, Q/K rows permuted for the llama architecture, Gemma
// norms stored as (1 + w). GGUF-native formats (f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k) are
// written as themselves, so llama.cpp can read them. BioQuant's bitsandbytes-style formats (int8,
// nf4, fp4, and nf4/fp4 with double quant) have no GGUF type: each such matrix is stored as an I8
// tensor of its raw rows, [row_bytes, rows], with `bioquant.format.<tensor>` (e.g. "nf4+dq") and
// `bioquant.cols.<tensor>` in the metadata; only BioQuant reads those back.
#pragma once
#include <string>

namespace bioquant {

class Model;
class Tokenizer;

// `tokenizer` (optional) is embedded as tokenizer.ggml.* when it can be (see tokenizer.h).
void write_model_gguf(const Model& model, const std::string& path, const std::string& name,
                      const Tokenizer* tokenizer);

}  // namespace bioquant
