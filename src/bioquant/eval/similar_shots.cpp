#include "bioquant/eval/similar_shots.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <numeric>

#include "bioquant/core/error.h"

namespace bioquant::eval {

std::vector<std::string> similarity_words(const std::string& text) {
  std::vector<std::string> words;
  std::string word;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x80 || std::isalnum(c)) {
      word.push_back(static_cast<char>(c < 0x80 ? std::tolower(c) : c));
    } else if (!word.empty()) {
      words.push_back(std::move(word));
      word.clear();
    }
  }
  if (!word.empty()) words.push_back(std::move(word));
  return words;
}

SimilarShots::SimilarShots(std::vector<Example> pool, const std::vector<std::string>& texts) : pool_(std::move(pool)) {
  check(texts.size() == pool_.size(), "SimilarShots: one text per pool example");
  lengths_.resize(pool_.size());
  for (size_t i = 0; i < pool_.size(); ++i) {
    std::map<std::string, int> counts;
    const std::vector<std::string> words = similarity_words(texts[i]);
    for (const std::string& w : words) ++counts[w];
    for (const auto& [w, n] : counts) postings_[w].push_back({i, n});
    lengths_[i] = static_cast<double>(words.size());
  }
  if (!pool_.empty())
    mean_length_ = std::accumulate(lengths_.begin(), lengths_.end(), 0.0) / static_cast<double>(pool_.size());
}

std::vector<Example> SimilarShots::choose(const std::string& query, int k, const std::set<std::string>& exclude) const {
  check(k >= 0, "--shots must be >= 0");
  std::vector<size_t> eligible;
  for (size_t i = 0; i < pool_.size(); ++i)
    if (!exclude.count(pool_[i].id)) eligible.push_back(i);
  check(static_cast<size_t>(k) <= eligible.size(), "only " + std::to_string(eligible.size()) +
                                                       " few-shot examples are available outside the evaluated set, " +
                                                       std::to_string(k) + " asked");
  // Okapi BM25: idf(w) = ln(1 + (N - n + 0.5) / (n + 0.5)), each query word (repeats counted) adding
  // idf * f (k1 + 1) / (f + k1 (1 - b + b |D| / mean |D|)).
  std::vector<double> score(pool_.size(), 0.0);
  const double n_docs = static_cast<double>(pool_.size());
  for (const std::string& w : similarity_words(query)) {
    const auto it = postings_.find(w);
    if (it == postings_.end()) continue;
    const double n = static_cast<double>(it->second.size());
    const double idf = std::log(1.0 + (n_docs - n + 0.5) / (n + 0.5));
    for (const auto& [doc, count] : it->second) {
      const double f = count, norm = kK1 * (1.0 - kB + kB * lengths_[doc] / std::max(mean_length_, 1e-9));
      score[doc] += idf * f * (kK1 + 1.0) / (f + norm);
    }
  }
  std::stable_sort(eligible.begin(), eligible.end(), [&](size_t a, size_t b) { return score[a] > score[b]; });
  std::vector<Example> out;
  for (int i = k - 1; i >= 0; --i) out.push_back(pool_[eligible[static_cast<size_t>(i)]]);
  return out;
}

}  // namespace bioquant::eval
