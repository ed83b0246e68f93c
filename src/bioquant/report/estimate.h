// Memory a run will need, predicted before anything is loaded: from config.json alone (or a
// synthetic shape), so a model can be sized before it is downloaded.
//
// What the CPU engine really holds at its peak, and how each part is modelled:
//   weights     every matrix in the format the quantization plan gives it (the same
//               plan_quantization as a real --quant load, so block fallbacks match) + f32 norms/biases.
//   load        matrices are converted one at a time: while matrix i is converted its source (as
//               stored: bf16, f16...) and its new storage are both resident, then the source is
//               released. The load peak is the largest (converted so far + source of the current
//               matrix) along the load order; a model run as stored keeps its source.
//   kv_cache    f32 K and V for `ctx` positions of every layer (model/decoder.h KVCache).
//   activations the decoder's f32 buffers for a `batch`-token forward pass (x, h, q, attn, k, v,
//               gate, up, rope tables) + one row of logits.
//   scratch     the quantized kernels' per-thread buffers for the int8 activations (each thread
//               prepares the whole batch; sized for the widest matrix) and attention scores.
//   runtime     the program itself: code, libraries, allocator, thread stacks (a measured constant).
// peak = runtime + max(load peak, steady).
//
// A model file is mapped, not read: a matrix kept as stored is paged in as it is used, and counts
// whole (the embedding too: fault-around and large page-cache folios map far more than the rows
// looked up; measured, a few dozen tokens map nearly all of it).
// steady = resident weights + KV cache + activations + scratch.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/core/dtype.h"
#include "bioquant/model/config.h"
#include "bioquant/model/quantize.h"

namespace bioquant::report {

struct EstimateOptions {
  std::string quant;                   // "" = as stored; a quant name or q4_k_m (+ double_quant)
  bool double_quant = false;           // nf4/fp4
  std::string quant_policy = "default";
  int64_t ctx = 4096;                  // KV-cache positions
  int64_t batch = 512;                 // tokens per forward pass
  int threads = 0;                     // 0 = all hardware threads
  std::string device = "cpu";          // cpu, or cuda: the GPU's memory (see estimate_memory)
  std::string kv_cache;                // cuda: bf16 (default), f32 or q8
};

// Where the model comes from, without its weights.
struct ModelShape {
  ModelConfig config;
  DType stored = DType::BF16;          // storage dtype of the matrices (config.json's torch_dtype)
  std::string source;                  // "config.json" or "synthetic" (built in memory: all written)
  std::string path;
};

// Reads `path`/config.json (+ generation_config.json) only; the storage dtype is its torch_dtype /
// dtype (float32 when absent, as transformers assumes). `dtype_override` ("bf16", "f16", "f32",
// "" = as declared) replaces it. GGUF files are refused (bioquant info sizes them).
ModelShape model_shape_from_path(const std::string& path, const std::string& dtype_override = "");
// A synthetic shape (model/synthetic.h) built in `dtype` (bf16, f16, f32).
ModelShape model_shape_synthetic(const std::string& name, const std::string& dtype = "bf16");

struct FormatBytes {
  double bytes = 0, parameters = 0;
};

struct MemoryEstimate {
  std::map<std::string, FormatBytes> weights_by_format;  // "q4_k", "bf16", "nf4+dq", ...
  double matrix_bytes = 0;       // all matrices in their planned formats
  double vector_bytes = 0;       // norms and biases (f32)
  double weights = 0;            // matrix_bytes + vector_bytes
  double weights_resident = 0;   // resident in a run (+ a tied embedding's source kept mapped); cuda: as uploaded
  double load_peak = 0;          // weights resident at the worst moment of loading
  std::string load_peak_at;      // the matrix being converted at that moment
  double kv_cache = 0;
  double kv_per_token = 0;
  double activations = 0;
  double scratch = 0;
  double runtime = 0;
  double steady = 0;             // weights + kv_cache + activations + scratch
  double total = 0;              // the predicted peak (see the header comment)
  int threads = 0;
  std::vector<TensorPlan> plan;  // format of every matrix (fallbacks have a note)

  nlohmann::json to_json() const;
};

// The runtime constant: resident memory of the bioquant process before any model is loaded
// (measured on the CLI binary: code, shared libraries, allocator arenas, thread stacks).
double runtime_overhead_bytes();

// On --device cuda the estimate is of GPU memory, as kernels/cuda/gpu_memory_plan.h lays it out: the
// weights as uploaded (every matrix but the token embedding, which stays in host memory), the KV cache
// in its GPU type, the workspace of a `batch`-token step (activations) with the tensor-core tiles and
// bf16 activations of prompts of 32+ tokens (scratch), and, as runtime, the CUDA context and cuBLAS
// measured on an H100; load_peak is 0 (matrices go to the GPU in their final format).
MemoryEstimate estimate_memory(const ModelShape& shape, const EstimateOptions& options);

// "40GiB", "512MiB", "1.5GB", "2000000000" (bytes) -> bytes. Error on anything else.
double parse_byte_size(const std::string& text);
// 1536 MiB -> "1.50 GiB"; below 1 GiB in MiB.
std::string format_bytes(double bytes);

}  // namespace bioquant::report
