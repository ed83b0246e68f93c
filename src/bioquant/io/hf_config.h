// Hugging Face config.json -> ModelConfig. Accepts both the transformers 4.x spelling
// (top-level rope_theta / rope_scaling) and the 5.x spelling (rope_parameters).
#pragma once
#include <string>

#include "bioquant/model/config.h"

namespace bioquant {

// `json_text` is the content of config.json; `where` names it in error messages.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& where);

// Adds the stop ids of a generation_config.json (eos_token_id: int or list) to config.eos_ids.
void merge_generation_config(const std::string& json_text, const std::string& where, ModelConfig& config);

}  // namespace bioquant
