// Which format each weight matrix gets when a model is quantized on load (`--quant Q`), and the
// quantization itself. Formats are in quant/quant.h; this is the recipe layer (like llama.cpp's
// llama_tensor_get_type), kept apart from the formats.
//
// Policy (the defaults, `--quant-policy default`):
// - bitsandbytes formats (int8, nf4, fp4): the linear layers are quantized; the token embedding and
//   the output projection keep their stored precision, as transformers + bitsandbytes do.
// - GGUF formats (q8_0, q4_0, q4_k, q5_k, q6_k): linear layers and the token embedding take the
//   format; the output projection takes q6_k (q8_0 keeps q8_0), as llama.cpp's llama-quantize does.
// - q4_k_m: q4_k, except attn_v and ffn_down of the first and last eighth of the layers and every
//   third layer in between, and the output, which take q6_k (llama.cpp's Q4_K_M mix).
// - f32, f16, bf16: every matrix converted.
// `--quant-policy all` quantizes the embedding and output too; `linear` only the linear layers.
// A matrix whose rows do not fill whole blocks falls back to the nearest format that fits
// (q4_k -> q4_0, q5_k/q6_k -> q8_0, nf4/fp4 -> int8, q8_0/q4_0 -> stored precision); every
// fallback is listed in the plan and by `bioquant info`.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bioquant/core/thread_pool.h"
#include "bioquant/model/config.h"
#include "bioquant/quant/quant.h"

namespace bioquant {

class Model;

enum class QuantPolicy { Default, All, Linear };

struct QuantRecipe {
  std::string name;            // as asked: "nf4", "q4_k_m", ...
  QuantType base = QuantType::F32;
  bool double_quant = false;   // nf4/fp4
  bool q4_k_m = false;
  QuantPolicy policy = QuantPolicy::Default;
  float int8_threshold = 0.0f;  // int8: LLM.int8 outlier threshold (0 = off; bitsandbytes uses 6.0)
};

// Parses a quant type name or recipe ("q4_k_m"); throws Error listing the valid names.
QuantRecipe parse_quant_recipe(const std::string& name, bool double_quant = false,
                               const std::string& policy = "default");
std::string quant_names_list();

struct TensorPlan {
  std::string name;     // e.g. "layers.3.ffn_down", "embedding", "output"
  int64_t rows = 0, cols = 0;
  QuantType from = QuantType::F32;
  QuantType to = QuantType::F32;
  bool double_quant = false;
  float outlier_threshold = 0.0f;  // int8 only
  std::string note;     // why `to` differs from the recipe's format ("" when it doesn't)

  size_t bytes() const { return static_cast<size_t>(rows) * quant_row_bytes(to, cols, double_quant); }
};

// The format of every matrix of `model` under `recipe` (nothing is changed).
std::vector<TensorPlan> plan_quantization(const Model& model, const QuantRecipe& recipe);

// "" unless the plan changes matrices that are stored quantized already (a GGUF or bitsandbytes
// checkpoint given --quant): then a line saying how many, from which formats, and that their new
// values come from dequantized ones (two roundings, not what the original weights would give).
std::string requantization_note(const std::vector<TensorPlan>& plan);

// Quantizes the model's matrices as planned, in parallel by rows. Source pages of mapped files
// are released as each tensor is done, so peak memory stays near the quantized size. progress, when
// given, is called with the weights done so far and their total: first with 0 done, then after each
// matrix that changes.
void quantize_model(Model& model, const std::vector<TensorPlan>& plan, ThreadPool& pool,
                    const std::function<void(int64_t done, int64_t total)>& progress = {});
// One matrix of `model` (the model adopts the new storage); optionally releases the source pages.
struct Matrix;
void quantize_matrix(Model& model, Matrix& m, const TensorPlan& p, ThreadPool& pool, bool release_source);

}  // namespace bioquant
