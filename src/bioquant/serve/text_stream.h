// Generated ids -> text, with OpenAI stop strings: text is released only once it can no longer turn
// out to be the start of a stop string, and at a stop string the text ends just before it (the
// stop string itself is never returned). The concatenation of everything released equals
// Tokenizer::decode(ids, skip_special=true) cut at the first stop string.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant::serve {

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop);

  // Feeds one generated id; returns the text it releases (maybe ""). After a stop string was met,
  // stopped() is true and further pushes release nothing.
  std::string push(int32_t id);
  // At the end of generation: whatever is still held back (nothing after a stop).
  std::string finish();
  bool stopped() const { return stopped_; }

 private:
  std::string release();  // from held_: up to a stop string, or what cannot start one

  StreamDecoder decoder_;
  std::vector<std::string> stop_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace bioquant::serve
