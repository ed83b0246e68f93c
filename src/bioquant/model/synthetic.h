// Real-size model shapes with random weights built in memory, so speed and memory can be
// measured without a checkpoint (`bioquant bench --synthetic llama-1b`).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "bioquant/core/dtype.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/model/model.h"

namespace bioquant {

// Named shapes: tiny, llama-1b, llama3-8b, llama3-70b, qwen2.5-7b, and the study's other families
// (mistral-7b, qwen3-8b, gemma2-9b, phi3-mini, phi4-14b). Throws Error listing them.
ModelConfig synthetic_config(const std::string& name);
const std::vector<std::string>& synthetic_names();

struct QuantRecipe;

// How the random weights are made.
enum class SyntheticWeights {
  Quantized,       // floats ~ U(-a, a), std 0.02, quantized by the recipe (real quantization error)
  RandomRows,      // straight in each matrix's target format (quant/random_rows.h): seconds, not hours
  RandomRowsOnGpu  // as RandomRows, but only the embedding is made here: the CUDA backend makes the
                   // other matrices in device memory (Matrix::random_seed), so the host never holds them
};

// Norms are 1; deterministic for a seed. With a recipe, each matrix is quantized as soon as it is
// made, so peak memory is that of the quantized model.
std::unique_ptr<Model> make_synthetic_model(const ModelConfig& config, DType dtype, uint64_t seed, ThreadPool& pool,
                                            const QuantRecipe* recipe = nullptr,
                                            SyntheticWeights how = SyntheticWeights::Quantized);

}  // namespace bioquant
