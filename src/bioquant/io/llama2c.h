// llama2.c checkpoints (Karpathy's run.c, the legacy "version 0" layout): seven int32 (dim,
// hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative vocab_size means the
// output classifier is stored apart from the embedding), then f32 weights in a fixed order, with
// RoPE tables that are not used. Known by that header and a file size that matches it exactly.
#pragma once
#include <memory>
#include <string>
#include <utility>

#include "bioquant/io/tensor_source.h"
#include "bioquant/model/config.h"

namespace bioquant {

// True when `path` is a regular file whose header describes a llama2.c model of exactly its size.
bool is_llama2c_checkpoint(const std::string& path);

// The model as a llama config (RMSNorm eps 1e-5, RoPE theta 10000, BOS 1, EOS 2) and its tensors
// under Hugging Face names. llama2.c rotates interleaved pairs (2i, 2i+1) of a head; the q and k rows
// are permuted to the rotate-half order (i, i + head_dim/2) the decoder uses, as transformers'
// convert script does, so the attention scores are the same.
std::pair<ModelConfig, std::unique_ptr<TensorSource>> load_llama2c(const std::string& path);

}  // namespace bioquant
