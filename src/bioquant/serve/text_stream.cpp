#include "bioquant/serve/text_stream.h"

#include <algorithm>

namespace bioquant::serve {

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stop)
    : decoder_(tokenizer, /*skip_special=*/true), stop_(std::move(stop)) {
  std::erase_if(stop_, [](const std::string& s) { return s.empty(); });
}

std::string TextStream::release() {
  // The earliest complete stop string ends the text.
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    std::string out = held_.substr(0, cut);
    held_.clear();
    stopped_ = true;
    return out;
  }
  // Hold back the longest tail that is a proper prefix of some stop string. (A stop string is
  // valid UTF-8, so such a tail starts on a character boundary: no character is ever split.)
  size_t keep = 0;
  for (const auto& s : stop_) {
    for (size_t len = std::min(s.size() - 1, held_.size()); len > keep; --len) {
      if (held_.compare(held_.size() - len, len, s, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string TextStream::push(int32_t id) {
  if (stopped_) return "";
  held_ += decoder_.push(id);
  return release();
}

std::string TextStream::finish() {
  if (stopped_) return "";
  held_ += decoder_.finish();
  std::string out = release();
  if (!stopped_) {
    out += held_;
    held_.clear();
  }
  return out;
}

}  // namespace bioquant::serve
