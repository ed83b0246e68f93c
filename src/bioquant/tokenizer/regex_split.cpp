#define PCRE2_CODE_UNIT_WIDTH 8
#include "bioquant/tokenizer/regex_split.h"

#include <pcre2.h>

#include "bioquant/core/error.h"
#include "bioquant/tokenizer/unicode.h"

namespace bioquant {

const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct RegexSplitter::Impl {
  pcre2_code* code = nullptr;
  std::string literal;  // non-empty for literal patterns
  ~Impl() {
    if (code) pcre2_code_free(code);
  }
};

RegexSplitter::RegexSplitter(const std::string& pattern, bool literal, SplitBehavior behavior, bool invert)
    : pattern_(pattern), impl_(std::make_unique<Impl>()), behavior_(behavior), invert_(invert) {
  if (literal) {
    check(!pattern.empty(), "tokenizer: empty split string");
    impl_->literal = pattern;
    return;
  }
  int err = 0;
  PCRE2_SIZE offset = 0;
  // UTF + UCP: \s, \d, \w and POSIX classes follow Unicode properties, as Oniguruma's do in HF.
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                              PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &offset, nullptr);
  if (impl_->code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    throw Error("tokenizer: bad split regex at offset " + std::to_string(offset) + ": " + reinterpret_cast<char*>(msg));
  }
  pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE);  // best effort: falls back to the interpreter
}

RegexSplitter::~RegexSplitter() = default;

void RegexSplitter::split(std::string_view text, std::vector<std::string_view>& out) const {
  // Spans covering `text`, each flagged as a match or not.
  struct Span {
    size_t begin, end;
    bool match;
  };
  std::vector<Span> spans;
  size_t pos = 0, last = 0;
  if (!impl_->literal.empty()) {
    while ((pos = text.find(impl_->literal, last)) != std::string_view::npos) {
      if (pos > last) spans.push_back({last, pos, false});
      spans.push_back({pos, pos + impl_->literal.size(), true});
      last = pos + impl_->literal.size();
    }
  } else {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(impl_->code, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    // PCRE2 validates the whole subject on every call unless told not to: check it once, on the
    // first call, then skip the check (otherwise splitting is quadratic in the text length).
    uint32_t options = 0;
    while (pos <= text.size()) {
      const int rc = pcre2_match(impl_->code, subject, text.size(), pos, options, md, nullptr);
      options = PCRE2_NO_UTF_CHECK;
      if (rc < 0) {
        if (rc == PCRE2_ERROR_NOMATCH) break;
        pcre2_match_data_free(md);
        throw Error(rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21
                        ? "tokenizer: text is not valid UTF-8"
                        : "tokenizer: regex matching failed (PCRE2 code " + std::to_string(rc) + ")");
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step over one character
        if (b >= text.size()) break;
        pos = b + static_cast<size_t>(unicode::utf8_length(static_cast<unsigned char>(text[b])));
        continue;
      }
      if (b > last) spans.push_back({last, b, false});
      spans.push_back({b, e, true});
      last = pos = e;
    }
    pcre2_match_data_free(md);
  }
  if (last < text.size()) spans.push_back({last, text.size(), false});
  if (invert_)
    for (Span& s : spans) s.match = !s.match;

  auto emit = [&](size_t b, size_t e) {
    if (e > b) out.push_back(text.substr(b, e - b));
  };
  switch (behavior_) {
    case SplitBehavior::Removed:
      for (const Span& s : spans)
        if (!s.match) emit(s.begin, s.end);
      break;
    case SplitBehavior::Isolated:
      for (const Span& s : spans) emit(s.begin, s.end);
      break;
    case SplitBehavior::MergedWithPrevious: {
      // A match joins the piece before it.
      size_t start = 0;
      bool open = false;
      for (const Span& s : spans) {
        if (s.match) {
          if (!open) start = s.begin;
          emit(start, s.end);
          open = false;
        } else {
          if (open) emit(start, s.begin);
          start = s.begin;
          open = true;
        }
      }
      if (open) emit(start, text.size());
      break;
    }
    case SplitBehavior::MergedWithNext: {
      // A match starts the piece after it.
      size_t start = 0;
      bool open = false;
      for (const Span& s : spans) {
        if (s.match) {
          if (open) emit(start, s.begin);
          start = s.begin;
          open = true;
        } else {
          if (!open) start = s.begin;
          emit(start, s.end);
          open = false;
        }
      }
      if (open) emit(start, text.size());
      break;
    }
    case SplitBehavior::Contiguous: {
      size_t i = 0;
      while (i < spans.size()) {
        size_t j = i;
        while (j + 1 < spans.size() && spans[j + 1].match == spans[i].match) ++j;
        emit(spans[i].begin, spans[j].end);
        i = j + 1;
      }
      break;
    }
  }
}

}  // namespace bioquant
