// How far a (quantized) model's next-token distributions are from a base model's, position by
// position over the same tokens: KL divergence statistics, same-top-token rate and perplexity of
// both, as llama.cpp's perplexity tool reports them (`--kl-divergence`).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "bioquant/model/decoder.h"

namespace bioquant {

struct FidelityStats {
  int64_t positions = 0;        // positions compared
  double kld_mean = 0, kld_median = 0, kld_p99 = 0, kld_max = 0;
  double same_top_rate = 0;     // argmax agrees
  double ppl_base = 0, ppl_model = 0;  // perplexity on the next token (positions with a successor)
};

// Runs both models over `tokens` in chunks of `chunk` tokens (each chunk starting with `bos` when
// given, as llama.cpp does) and compares every position. `progress` (optional) gets (done, total).
FidelityStats compare_models(Decoder& base, Decoder& model, const std::vector<int32_t>& tokens, int64_t chunk,
                             int32_t bos, const std::function<void(int64_t, int64_t)>& progress = {});

// KL(p || q) of two logit rows (softmax taken here), in nats.
double kl_divergence(const float* logits_p, const float* logits_q, int64_t n);

}  // namespace bioquant
