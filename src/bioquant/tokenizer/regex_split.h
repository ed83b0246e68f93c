// Regex splitting with PCRE2 (Unicode classes, lookahead, JIT), with the HF tokenizers
// "Split" delimiter behaviours.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace bioquant {

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

class RegexSplitter {
 public:
  // `literal`: the pattern is a plain string, not a regex. Throws Error on a bad pattern.
  RegexSplitter(const std::string& pattern, bool literal, SplitBehavior behavior, bool invert);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  // Appends the pieces of `text` to `out` (empty pieces are dropped, as HF does).
  void split(std::string_view text, std::vector<std::string_view>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  SplitBehavior behavior_;
  bool invert_;
};

// The split patterns of well-known tokenizers (used by GGUF `tokenizer.ggml.pre` and tests).
extern const char* const kGpt2Pattern;
extern const char* const kLlama3Pattern;
extern const char* const kQwen2Pattern;

}  // namespace bioquant
