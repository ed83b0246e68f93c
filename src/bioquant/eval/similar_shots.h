// Few-shot examples retrieved per test item by similarity (the study's "retrieved by similarity"
// few-shot, `--method few-shot-similar`): Okapi BM25 over the words of the examples' input text, the
// few-shot split indexed once. Lexical, deterministic and local: no embedding model is needed.
#pragma once
#include <cstddef>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "bioquant/eval/task.h"

namespace bioquant::eval {

// Lowercased runs of ASCII letters and digits, and of non-ASCII bytes (UTF-8 letters stay whole).
std::vector<std::string> similarity_words(const std::string& text);

class SimilarShots {
 public:
  static constexpr double kK1 = 1.2, kB = 0.75;
  static constexpr const char* kDescription = "BM25 (k1 1.2, b 0.75) over the lowercased words of the input text";

  // texts[i]: pool[i]'s input text as the prompt shows it.
  SimilarShots(std::vector<Example> pool, const std::vector<std::string>& texts);

  // The k pool examples whose input is most similar to `query` (BM25 score), none whose id is in
  // `exclude`; ties go to the earlier pool example. Least similar first, so the closest sits next to
  // the test input. Error when fewer than k are eligible.
  std::vector<Example> choose(const std::string& query, int k, const std::set<std::string>& exclude) const;

  size_t size() const { return pool_.size(); }

 private:
  std::vector<Example> pool_;
  std::vector<double> lengths_;  // words per pool text
  double mean_length_ = 0.0;
  std::map<std::string, std::vector<std::pair<size_t, int>>> postings_;  // word -> (pool index, count)
};

}  // namespace bioquant::eval
