// GGUF model files as a model source: ModelConfig from `{arch}.*` metadata and the tensors
// renamed to the Hugging Face names the binder expects, with HF shapes. llama-architecture
// files have the rows of Q and K permuted by llama.cpp's converter (so RoPE can rotate adjacent
// pairs); they are put back in HF order here, which works for every format because each stored
// row is self-contained. Gemma norms were stored as (1 + w) by the converter, so the config read
// from a GGUF file treats them as plain scales.
#pragma once
#include <memory>
#include <string>

#include "bioquant/io/gguf.h"
#include "bioquant/io/tensor_source.h"
#include "bioquant/model/config.h"

namespace bioquant {

ModelConfig config_from_gguf(const GgufFile& gguf);

class GgufTensorSource : public TensorSource {
 public:
  GgufTensorSource(std::shared_ptr<const GgufFile> gguf, const ModelConfig& config);
  const TensorView* find(const std::string& name) const override;
  size_t mapped_bytes() const override;
  void release(const uint8_t* data, size_t nbytes) const override;

 private:
  std::shared_ptr<const GgufFile> gguf_;
  std::map<std::string, TensorView> views_;
  std::vector<std::unique_ptr<uint8_t[]>> owned_;  // permuted / adjusted copies
};

}  // namespace bioquant
