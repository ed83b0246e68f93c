// What the model-running subcommands share: the model flags, opening (and quantizing) a model,
// device checks and the peak-memory line.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>

#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/model/quantize.h"

namespace bioquant::cli {

// Number checks for options. CLI11's PositiveNumber / NonNegativeNumber print the largest double
// (300 digits) as their range; these say what was expected. Non-finite values are refused too.
CLI::Validator positive_number();
CLI::Validator non_negative_number();

struct Common {
  std::string model;
  int threads = 0;
  std::string device = "cpu";
  std::string quant;
  bool double_quant = false;
  std::string quant_policy = "default";
  float int8_threshold = 0.0f;
  std::string kv_cache;  // GPU KV cache type; empty = the backend's default
  double gpu_memory_gib = 0.0;  // --gpu-memory: the GPU's memory as the run may use it (0: all of it)
  bool exact = false;           // --exact: exact numerics (the same logits on the CPU and any GPU)
};

void add_model_flags(CLI::App& app, Common& c, bool required = true);
std::optional<QuantRecipe> recipe_of(const Common& c);
// Loads a model, noting on stderr what loading changed (GGUF formats held wider: Model::load_notes).
std::unique_ptr<Model> load_model(const std::string& path);
// load_model, then quantizes on load when --quant is given (fallbacks reported on stderr).
std::unique_ptr<Model> open_model(const Common& c, ThreadPool& pool);
void report_peak_memory();
// -1 for the CPU, N for CUDA device N (--device); throws Error for an unknown or absent device, or for
// GPU flags (--kv-cache, --gpu-memory) given for the CPU: before any model is loaded.
int check_device(const Common& c);
// Applies the GPU flags (checked by check_device) before a decoder is made: --gpu-memory's limit
// (set_cuda_memory_limit), and returns --kv-cache's type (bf16 when not given; f32 with --exact).
KvType apply_gpu_flags(const Common& c, int device);
// The GPU's memory as the run left it (stderr), beside the host's peak RSS; nothing on the CPU.
void report_gpu_memory(const Decoder& decoder);

}  // namespace bioquant::cli
