#include "bioquant/tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/io/gguf.h"
#include "bioquant/io/llama2c.h"
#include "bioquant/io/llama2c.h"
#include "bioquant/tokenizer/bpe.h"
#include "bioquant/tokenizer/regex_split.h"
#include "bioquant/tokenizer/unicode.h"

namespace bioquant {

using nlohmann::json;

namespace {

const std::string kSpace = "\xe2\x96\x81";  // "▁", SentencePiece's visible space

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty() || s.find(from) == std::string::npos) return;
  std::string out;  // built anew: GCC 12 misreports string::replace here (-Wrestrict)
  out.reserve(s.size());
  size_t pos = 0, hit;
  while ((hit = s.find(from, pos)) != std::string::npos) {
    out.append(s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  s = std::move(out);
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// The type of each piece of a serialized SentencePiece ModelProto (field 1: repeated SentencePiece
// {1: piece, 2: score, 3: type}; a type left out is NORMAL = 1). This library version has no
// IsUserDefined(), and GGUF needs user-defined pieces (type 4) told apart. Empty when malformed.
std::vector<int32_t> sentencepiece_piece_types(std::string_view proto) {
  size_t pos = 0;
  const auto varint = [](std::string_view b, size_t& at, uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64 && at < b.size(); shift += 7) {
      const auto byte = static_cast<uint8_t>(b[at++]);
      v |= static_cast<uint64_t>(byte & 0x7F) << shift;
      if (!(byte & 0x80)) return true;
    }
    return false;
  };
  // Skips a field's value of wire type `wire`; false when it runs past the end.
  const auto skip = [&](std::string_view b, size_t& at, uint64_t wire) {
    uint64_t n = 0;
    switch (wire) {
      case 0: return varint(b, at, n);
      case 1: at += 8; return at <= b.size();
      case 2: if (!varint(b, at, n) || n > b.size() - at) return false; at += n; return true;
      case 5: at += 4; return at <= b.size();
      default: return false;
    }
  };
  std::vector<int32_t> types;
  while (pos < proto.size()) {
    uint64_t key = 0, len = 0;
    if (!varint(proto, pos, key)) return {};
    if (key != ((1u << 3) | 2)) {
      if (!skip(proto, pos, key & 7)) return {};
      continue;
    }
    if (!varint(proto, pos, len) || len > proto.size() - pos) return {};
    const std::string_view piece = proto.substr(pos, len);
    pos += len;
    int32_t type = 1;
    for (size_t at = 0; at < piece.size();) {
      uint64_t k = 0, v = 0;
      if (!varint(piece, at, k)) return {};
      if (k == ((3u << 3) | 0)) {
        if (!varint(piece, at, v)) return {};
        type = static_cast<int32_t>(v);
      } else if (!skip(piece, at, k & 7)) {
        return {};
      }
    }
    types.push_back(type);
  }
  return types;
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The pipeline.

struct NormalizerStep {
  enum Kind { NFC, NFKC, NFD, Lowercase, Prepend, Replace } kind;
  std::string a, b;  // Prepend: a; Replace: a -> b
};

struct PreTokenizerStep {
  enum Kind { ByteLevel, Split, Metaspace, Digits } kind;
  std::shared_ptr<RegexSplitter> regex;  // ByteLevel (when use_regex) and Split
  bool add_prefix_space = false;         // ByteLevel
  std::string replacement = kSpace;      // Metaspace
  enum Prepend { Always, First, Never } prepend = Always;
  bool split = false;                    // Metaspace: split on the replacement
};

struct DecoderStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;
  int start = 0, stop = 0;
  bool prepend_first = true;  // Metaspace
};

struct Tokenizer::Impl {
  std::vector<AddedToken> added;                              // longest first
  std::unordered_map<int32_t, size_t> added_by_id;            // id -> index in `added`
  std::vector<size_t> added_by_first_byte[256];               // candidates per first byte, longest first
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::unique_ptr<BpeModel> bpe;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> spm;  // raw .model files
  std::vector<DecoderStep> decoders;
  std::vector<int32_t> prefix_ids, suffix_ids;                // post-processor (add_special)
  int64_t vocab_size = 0;
  // SentencePiece BPE from pieces + scores (GGUF "llama" vocabularies, llama2.c): what a GGUF file
  // needs to describe it again.
  struct SentencePieceBpe {
    std::vector<float> scores;
    std::vector<int32_t> types;
    bool add_space_prefix = true;
  };
  std::optional<SentencePieceBpe> sentencepiece_bpe;
  std::string gguf_pre;  // a GGUF byte-level vocabulary's tokenizer.ggml.pre, as read

  void finish_added() {
    std::stable_sort(added.begin(), added.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
    added_by_id.clear();
    for (auto& v : added_by_first_byte) v.clear();
    for (size_t i = 0; i < added.size(); ++i) {
      added_by_id[added[i].id] = i;
      if (!added[i].content.empty()) added_by_first_byte[static_cast<uint8_t>(added[i].content[0])].push_back(i);
    }
    for (const AddedToken& t : added) vocab_size = std::max<int64_t>(vocab_size, t.id + 1);
  }

  // Pieces of text between added tokens, or an added token's id.
  struct Segment {
    std::string_view text;
    size_t offset;
    int32_t id;  // -1 for text
  };

  std::vector<Segment> split_added(std::string_view text, bool with_special) const {
    std::vector<Segment> out;
    size_t start = 0, i = 0;
    auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    while (i < text.size()) {
      const AddedToken* hit = nullptr;
      for (size_t k : added_by_first_byte[static_cast<uint8_t>(text[i])]) {
        const AddedToken& t = added[k];
        if (!with_special && t.special) continue;
        if (t.content.empty() || text.compare(i, t.content.size(), t.content) != 0) continue;
        if (t.single_word && ((i > 0 && is_word(text[i - 1])) ||
                              (i + t.content.size() < text.size() && is_word(text[i + t.content.size()]))))
          continue;
        hit = &t;
        break;
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t left = i, right = i + hit->content.size();
      if (hit->lstrip)
        while (left > start && std::isspace(static_cast<unsigned char>(text[left - 1]))) --left;
      if (hit->rstrip)
        while (right < text.size() && std::isspace(static_cast<unsigned char>(text[right]))) ++right;
      if (left > start) out.push_back({text.substr(start, left - start), start, -1});
      out.push_back({std::string_view(), left, hit->id});
      start = i = right;
    }
    if (start < text.size()) out.push_back({text.substr(start), start, -1});
    return out;
  }

  void encode_text(std::string_view raw, size_t offset, std::vector<int32_t>& ids) const {
    if (spm) {
      std::vector<int> pieces;
      const auto status = spm->Encode(absl::string_view(raw.data(), raw.size()), &pieces);
      check(status.ok(), "tokenizer: SentencePiece failed: " + status.ToString());
      ids.insert(ids.end(), pieces.begin(), pieces.end());
      return;
    }
    std::string text(raw);
    for (const NormalizerStep& n : normalizers) {
      switch (n.kind) {
        case NormalizerStep::NFC: text = unicode::nfc(text); break;
        case NormalizerStep::NFKC: text = unicode::nfkc(text); break;
        case NormalizerStep::NFD: text = unicode::nfd(text); break;
        case NormalizerStep::Lowercase: text = unicode::lowercase(text); break;
        case NormalizerStep::Prepend:
          if (!text.empty()) text = n.a + text;
          break;
        case NormalizerStep::Replace: replace_all(text, n.a, n.b); break;
      }
    }
    // Pre-tokenisation: a list of pieces, each step splitting every piece further.
    std::vector<std::string> pieces{text};
    for (const PreTokenizerStep& p : pre_tokenizers) {
      std::vector<std::string> next;
      for (std::string& piece : pieces) {
        switch (p.kind) {
          case PreTokenizerStep::Metaspace: {
            replace_all(piece, " ", p.replacement);
            const bool starts = piece.compare(0, p.replacement.size(), p.replacement) == 0;
            if (!starts && (p.prepend == PreTokenizerStep::Always || (p.prepend == PreTokenizerStep::First && offset == 0)))
              piece = p.replacement + piece;
            if (!p.split) {
              next.push_back(std::move(piece));
              break;
            }
            // Each replacement starts a new piece.
            size_t b = 0;
            for (size_t pos = piece.find(p.replacement, 1); pos != std::string::npos; pos = piece.find(p.replacement, pos + 1)) {
              next.push_back(piece.substr(b, pos - b));
              b = pos;
            }
            next.push_back(piece.substr(b));
            break;
          }
          case PreTokenizerStep::Split:
          case PreTokenizerStep::Digits:
          case PreTokenizerStep::ByteLevel: {
            std::string source = std::move(piece);
            if (p.kind == PreTokenizerStep::ByteLevel && p.add_prefix_space && !source.empty() && source[0] != ' ')
              source = " " + source;
            std::vector<std::string_view> parts;
            if (p.regex) {
              p.regex->split(source, parts);
            } else {
              parts.push_back(source);
            }
            for (std::string_view part : parts) {
              if (p.kind != PreTokenizerStep::ByteLevel) {
                next.emplace_back(part);
                continue;
              }
              std::string mapped;
              for (char c : part) mapped += unicode::byte_to_unicode(static_cast<uint8_t>(c));
              next.push_back(std::move(mapped));
            }
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    for (const std::string& piece : pieces) bpe->encode(piece, ids);
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special) const {
    if (spm) {
      // SentencePiece decodes its own pieces; added tokens are spliced in between runs.
      std::string out;
      std::vector<int> run;
      auto flush = [&] {
        if (run.empty()) return;
        std::string piece;
        spm->Decode(run, &piece).IgnoreError();
        out += piece;
        run.clear();
      };
      for (int32_t id : ids) {
        auto it = added_by_id.find(id);
        if (it != added_by_id.end()) {
          flush();
          if (!(skip_special && added[it->second].special)) out += added[it->second].content;
        } else if (id >= 0 && id < spm->GetPieceSize()) {
          if (skip_special && spm->IsControl(id)) continue;
          run.push_back(id);
        }
      }
      flush();
      return unicode::to_valid_utf8(out);
    }
    std::vector<std::string> tokens;
    std::vector<bool> is_added;
    for (int32_t id : ids) {
      auto it = added_by_id.find(id);
      if (it != added_by_id.end()) {
        if (skip_special && added[it->second].special) continue;
        tokens.push_back(added[it->second].content);
        is_added.push_back(true);
      } else if (id >= 0 && static_cast<size_t>(id) < bpe->vocab().size()) {
        tokens.push_back(bpe->vocab()[static_cast<size_t>(id)]);
        is_added.push_back(false);
      }
    }
    // HF decodes added tokens as plain text and runs the decoder over every token.
    for (const DecoderStep& d : decoders) {
      switch (d.kind) {
        case DecoderStep::Replace:
          for (std::string& t : tokens) replace_all(t, d.a, d.b);
          break;
        case DecoderStep::ByteFallback: {
          std::vector<std::string> merged;
          std::string bytes;
          auto flush = [&] {
            if (!bytes.empty()) merged.push_back(std::move(bytes));
            bytes.clear();
          };
          for (std::string& t : tokens) {
            unsigned v = 0;
            if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::sscanf(t.c_str() + 3, "%2X", &v) == 1) {
              bytes += static_cast<char>(v);
            } else {
              flush();
              merged.push_back(std::move(t));
            }
          }
          flush();
          tokens = std::move(merged);
          break;
        }
        case DecoderStep::Fuse: {
          std::string all;
          for (const std::string& t : tokens) all += t;
          tokens.assign(1, all);
          break;
        }
        case DecoderStep::Strip:
          for (std::string& t : tokens) {
            int s = 0;
            while (s < d.start && t.compare(0, d.a.size(), d.a) == 0) {
              t.erase(0, d.a.size());
              ++s;
            }
            int e = 0;
            while (e < d.stop && ends_with(t, d.a)) {
              t.erase(t.size() - d.a.size());
              ++e;
            }
          }
          break;
        case DecoderStep::Metaspace:
          for (size_t i = 0; i < tokens.size(); ++i) {
            replace_all(tokens[i], d.a, " ");
            if (i == 0 && d.prepend_first && !tokens[i].empty() && tokens[i][0] == ' ') tokens[i].erase(0, 1);
          }
          break;
        case DecoderStep::ByteLevel:
          for (std::string& t : tokens) {
            std::string bytes;
            size_t i = 0;
            while (i < t.size()) {
              const size_t start = i;
              const int b = unicode::unicode_to_byte(unicode::next_code_point(t, i));
              if (b >= 0) {
                bytes += static_cast<char>(b);
              } else {
                bytes.append(t, start, i - start);
              }
            }
            t = std::move(bytes);
          }
          break;
      }
    }
    std::string out;
    for (const std::string& t : tokens) out += t;
    return unicode::to_valid_utf8(out);
  }
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special, bool parse_special) const {
  std::vector<int32_t> ids;
  if (add_special) ids = impl_->prefix_ids;
  for (const Impl::Segment& s : impl_->split_added(text, parse_special)) {
    if (s.id >= 0) {
      ids.push_back(s.id);
    } else {
      impl_->encode_text(s.text, s.offset, ids);
    }
  }
  if (add_special) ids.insert(ids.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  return impl_->decode(ids, skip_special);
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  for (const AddedToken& t : impl_->added)
    if (t.content == token) return t.id;
  if (impl_->bpe) {
    const int32_t id = impl_->bpe->find(token);
    if (id >= 0) return id;
  }
  if (impl_->spm) {
    const int id = impl_->spm->PieceToId(absl::string_view(token.data(), token.size()));
    if (id != impl_->spm->unk_id() || token == impl_->spm->IdToPiece(id)) return id;
  }
  return std::nullopt;
}

std::string Tokenizer::token_text(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (impl_->bpe && id >= 0 && static_cast<size_t>(id) < impl_->bpe->vocab().size()) return impl_->bpe->vocab()[static_cast<size_t>(id)];
  if (impl_->spm && id >= 0 && id < impl_->spm->GetPieceSize()) return impl_->spm->IdToPiece(id);
  return "";
}

bool Tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].special;
  return impl_->spm && id >= 0 && id < impl_->spm->GetPieceSize() && impl_->spm->IsControl(id);
}

std::vector<std::pair<std::string, GgufWriteValue>> Tokenizer::gguf_metadata() const {
  using T = GgufValueType;
  std::vector<std::pair<std::string, GgufWriteValue>> md;
  json tokens = json::array(), types = json::array(), scores = json::array();
  if (impl_->spm) {
    const auto& sp = *impl_->spm;
    const std::vector<int32_t> proto_types = sentencepiece_piece_types(sp.serialized_model_proto());
    for (int i = 0; i < sp.GetPieceSize(); ++i) {
      tokens.push_back(sp.IdToPiece(i));
      scores.push_back(sp.GetScore(i));
      const bool user_defined = static_cast<size_t>(i) < proto_types.size() && proto_types[static_cast<size_t>(i)] == 4;
      types.push_back(sp.IsUnknown(i) ? 2 : sp.IsControl(i) ? 3 : user_defined ? 4 : sp.IsUnused(i) ? 5 : sp.IsByte(i) ? 6 : 1);
    }
    md.push_back({"tokenizer.ggml.model", {T::STRING, T::U8, "llama"}});
    md.push_back({"tokenizer.ggml.tokens", {T::ARRAY, T::STRING, tokens}});
    md.push_back({"tokenizer.ggml.scores", {T::ARRAY, T::F32, scores}});
    md.push_back({"tokenizer.ggml.token_type", {T::ARRAY, T::I32, types}});
  } else if (impl_->bpe && impl_->sentencepiece_bpe) {
    const auto& d = *impl_->sentencepiece_bpe;
    for (const std::string& piece : impl_->bpe->vocab()) tokens.push_back(piece);
    md.push_back({"tokenizer.ggml.model", {T::STRING, T::U8, "llama"}});
    md.push_back({"tokenizer.ggml.tokens", {T::ARRAY, T::STRING, tokens}});
    md.push_back({"tokenizer.ggml.scores", {T::ARRAY, T::F32, json(d.scores)}});
    md.push_back({"tokenizer.ggml.token_type", {T::ARRAY, T::I32, json(d.types)}});
    md.push_back({"tokenizer.ggml.add_space_prefix", {T::BOOL, T::U8, d.add_space_prefix}});
  } else if (impl_->bpe) {
    bool byte_level = false;
    std::string pre = impl_->gguf_pre.empty() ? "default" : impl_->gguf_pre;
    for (const PreTokenizerStep& p : impl_->pre_tokenizers) {
      if (p.kind == PreTokenizerStep::ByteLevel) byte_level = true;
      if (p.regex && p.regex->pattern() == kLlama3Pattern) pre = "llama-bpe";
      if (p.regex && p.regex->pattern() == kQwen2Pattern) pre = "qwen2";
      if (p.regex && p.regex->pattern() == kGpt2Pattern) pre = "gpt-2";
    }
    if (!byte_level) return md;  // SentencePiece-style tokenizer.json: no scores to describe it with
    std::vector<std::string> vocab = impl_->bpe->vocab();
    std::vector<int> type(vocab.size(), 1);
    for (const AddedToken& a : impl_->added) {
      if (static_cast<size_t>(a.id) >= vocab.size()) {
        vocab.resize(static_cast<size_t>(a.id) + 1);
        type.resize(vocab.size(), 1);
      }
      vocab[static_cast<size_t>(a.id)] = a.content;
      type[static_cast<size_t>(a.id)] = a.special ? 3 : 4;
    }
    for (size_t i = 0; i < vocab.size(); ++i) {
      tokens.push_back(vocab[i]);
      types.push_back(type[i]);
    }
    json merges = json::array();
    for (const auto& [a, b] : impl_->bpe->merges_in_order()) merges.push_back(a + " " + b);
    md.push_back({"tokenizer.ggml.model", {T::STRING, T::U8, "gpt2"}});
    md.push_back({"tokenizer.ggml.pre", {T::STRING, T::U8, pre}});
    md.push_back({"tokenizer.ggml.tokens", {T::ARRAY, T::STRING, tokens}});
    md.push_back({"tokenizer.ggml.token_type", {T::ARRAY, T::I32, types}});
    md.push_back({"tokenizer.ggml.merges", {T::ARRAY, T::STRING, merges}});
  } else {
    return md;
  }
  md.push_back({"tokenizer.ggml.add_bos_token", {T::BOOL, T::U8, !impl_->prefix_ids.empty()}});
  md.push_back({"tokenizer.ggml.add_eos_token", {T::BOOL, T::U8, !impl_->suffix_ids.empty()}});
  if (bos_id_) md.push_back({"tokenizer.ggml.bos_token_id", {T::U32, T::U8, *bos_id_}});
  if (eos_id_) md.push_back({"tokenizer.ggml.eos_token_id", {T::U32, T::U8, *eos_id_}});
  if (!chat_template_.empty()) md.push_back({"tokenizer.chat_template", {T::STRING, T::U8, chat_template_}});
  return md;
}

std::string StreamDecoder::push(int32_t id) {
  ids_.push_back(id);
  const std::string text = tokenizer_.decode(ids_, skip_special_);
  // Hold back a trailing U+FFFD: it may be the first bytes of a character still to come.
  size_t end = text.size();
  while (end >= 3 && text.compare(end - 3, 3, "\xef\xbf\xbd") == 0) end -= 3;
  if (end <= emitted_) return "";
  std::string out = text.substr(emitted_, end - emitted_);
  emitted_ = end;
  return out;
}

std::string StreamDecoder::finish() {
  const std::string text = tokenizer_.decode(ids_, skip_special_);
  std::string out = emitted_ < text.size() ? text.substr(emitted_) : "";
  emitted_ = text.size();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Loaders.

namespace {

json parse_json_file(const std::string& path) {
  try {
    return json::parse(read_text_file(path));
  } catch (const json::exception&) {
    throw Error(path + ": not valid JSON");
  }
}

SplitBehavior parse_behavior(const json& j, const std::string& where) {
  const std::string b = j.is_string() ? j.get<std::string>() : "";
  if (b == "Removed") return SplitBehavior::Removed;
  if (b == "Isolated") return SplitBehavior::Isolated;
  if (b == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (b == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (b == "Contiguous") return SplitBehavior::Contiguous;
  throw Error(where + ": unknown split behavior " + j.dump());
}

std::pair<std::string, bool> parse_pattern(const json& j, const std::string& where) {
  check(j.is_object(), where + ": pattern must be an object");
  if (j.contains("Regex") && j["Regex"].is_string()) return {j["Regex"].get<std::string>(), false};
  if (j.contains("String") && j["String"].is_string()) return {j["String"].get<std::string>(), true};
  throw Error(where + ": pattern must be {\"Regex\": ...} or {\"String\": ...}");
}

PreTokenizerStep::Prepend parse_prepend(const json& j) {
  if (j.contains("prepend_scheme") && j["prepend_scheme"].is_string()) {
    const std::string s = j["prepend_scheme"];
    if (s == "first") return PreTokenizerStep::First;
    if (s == "never") return PreTokenizerStep::Never;
    return PreTokenizerStep::Always;
  }
  return j.value("add_prefix_space", true) ? PreTokenizerStep::Always : PreTokenizerStep::Never;
}

void add_normalizer(const json& j, const std::string& where, std::vector<NormalizerStep>& out) {
  if (j.is_null()) return;
  check(j.is_object() && j.contains("type"), where + ": normalizer without a type");
  const std::string type = j["type"];
  if (type == "Sequence") {
    for (const json& n : j.at("normalizers")) add_normalizer(n, where, out);
  } else if (type == "NFC") {
    out.push_back({NormalizerStep::NFC, "", ""});
  } else if (type == "NFKC") {
    out.push_back({NormalizerStep::NFKC, "", ""});
  } else if (type == "NFD") {
    out.push_back({NormalizerStep::NFD, "", ""});
  } else if (type == "Lowercase") {
    out.push_back({NormalizerStep::Lowercase, "", ""});
  } else if (type == "Prepend") {
    out.push_back({NormalizerStep::Prepend, j.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    auto [pattern, literal] = parse_pattern(j.at("pattern"), where);
    check(literal, where + ": regex Replace normalizers are not supported");
    out.push_back({NormalizerStep::Replace, pattern, j.at("content").get<std::string>()});
  } else {
    throw Error(where + ": unsupported normalizer '" + type + "'");
  }
}

void add_pre_tokenizer(const json& j, const std::string& where, std::vector<PreTokenizerStep>& out) {
  if (j.is_null()) return;
  check(j.is_object() && j.contains("type"), where + ": pre_tokenizer without a type");
  const std::string type = j["type"];
  PreTokenizerStep p{};
  if (type == "Sequence") {
    for (const json& n : j.at("pretokenizers")) add_pre_tokenizer(n, where, out);
    return;
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizerStep::ByteLevel;
    p.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true))
      p.regex = std::make_shared<RegexSplitter>(kGpt2Pattern, false, SplitBehavior::Isolated, false);
  } else if (type == "Split") {
    p.kind = PreTokenizerStep::Split;
    auto [pattern, literal] = parse_pattern(j.at("pattern"), where);
    p.regex = std::make_shared<RegexSplitter>(pattern, literal, parse_behavior(j.at("behavior"), where), j.value("invert", false));
  } else if (type == "Metaspace") {
    p.kind = PreTokenizerStep::Metaspace;
    p.replacement = j.value("replacement", kSpace);
    p.prepend = parse_prepend(j);
    p.split = j.value("split", true);
  } else if (type == "Digits") {
    p.kind = PreTokenizerStep::Digits;
    p.regex = std::make_shared<RegexSplitter>(j.value("individual_digits", false) ? "\\p{N}" : "\\p{N}+", false,
                                              SplitBehavior::Isolated, false);
  } else {
    throw Error(where + ": unsupported pre_tokenizer '" + type + "'");
  }
  out.push_back(std::move(p));
}

void add_decoder(const json& j, const std::string& where, std::vector<DecoderStep>& out) {
  if (j.is_null()) return;
  check(j.is_object() && j.contains("type"), where + ": decoder without a type");
  const std::string type = j["type"];
  DecoderStep d{};
  if (type == "Sequence") {
    for (const json& n : j.at("decoders")) add_decoder(n, where, out);
    return;
  } else if (type == "ByteLevel") {
    d.kind = DecoderStep::ByteLevel;
  } else if (type == "Replace") {
    d.kind = DecoderStep::Replace;
    auto [pattern, literal] = parse_pattern(j.at("pattern"), where);
    check(literal, where + ": regex Replace decoders are not supported");
    d.a = pattern;
    d.b = j.at("content").get<std::string>();
  } else if (type == "ByteFallback") {
    d.kind = DecoderStep::ByteFallback;
  } else if (type == "Fuse") {
    d.kind = DecoderStep::Fuse;
  } else if (type == "Strip") {
    d.kind = DecoderStep::Strip;
    d.a = j.at("content").get<std::string>();
    d.start = j.value("start", 0);
    d.stop = j.value("stop", 0);
  } else if (type == "Metaspace") {
    d.kind = DecoderStep::Metaspace;
    d.a = j.value("replacement", kSpace);
    d.prepend_first = parse_prepend(j) != PreTokenizerStep::Never;
  } else {
    throw Error(where + ": unsupported decoder '" + type + "'");
  }
  out.push_back(std::move(d));
}

// Post-processors that only add special tokens around a single sequence.
void add_post_processor(const json& j, const std::string& where, const Tokenizer::Impl& impl, std::vector<int32_t>& prefix,
                        std::vector<int32_t>& suffix) {
  if (j.is_null()) return;
  const std::string type = j.value("type", std::string());
  if (type == "Sequence") {
    for (const json& p : j.at("processors")) add_post_processor(p, where, impl, prefix, suffix);
  } else if (type == "ByteLevel") {
    // Offsets only.
  } else if (type == "TemplateProcessing") {
    bool seen_sequence = false;
    for (const json& item : j.at("single")) {
      if (item.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      check(item.contains("SpecialToken"), where + ": unsupported template item " + item.dump());
      const std::string name = item["SpecialToken"].at("id");
      check(j.contains("special_tokens") && j["special_tokens"].contains(name),
            where + ": template names unknown special token '" + name + "'");
      for (const json& id : j["special_tokens"][name].at("ids")) (seen_sequence ? suffix : prefix).push_back(id.get<int32_t>());
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    prefix.push_back(j.at("cls").at(1).get<int32_t>());
    suffix.push_back(j.at("sep").at(1).get<int32_t>());
  } else {
    throw Error(where + ": unsupported post_processor '" + type + "'");
  }
  (void)impl;
}

// tokenizer_config.json: chat template and the names of BOS/EOS.
void read_tokenizer_config(const std::string& dir, Tokenizer& tok, std::string& chat_template, std::string& bos,
                           std::string& eos) {
  const std::string path = dir + "/tokenizer_config.json";
  auto token_name = [](const json& v) -> std::string {
    if (v.is_string()) return v.get<std::string>();
    if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
    return "";
  };
  if (is_file(path)) {
    const json cfg = parse_json_file(path);
    if (cfg.contains("chat_template")) {
      const json& t = cfg["chat_template"];
      if (t.is_string()) {
        chat_template = t.get<std::string>();
      } else if (t.is_array()) {  // named templates: use "default"
        for (const json& entry : t)
          if (entry.value("name", "") == "default" && entry.contains("template")) chat_template = entry["template"].get<std::string>();
      }
    }
    if (cfg.contains("bos_token")) bos = token_name(cfg["bos_token"]);
    if (cfg.contains("eos_token")) eos = token_name(cfg["eos_token"]);
  }
  if (chat_template.empty() && is_file(dir + "/chat_template.jinja")) chat_template = read_text_file(dir + "/chat_template.jinja");
  (void)tok;
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

std::vector<std::pair<std::string, std::string>> parse_merges(const json& merges, const std::string& where) {
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(merges.size());
  for (const json& m : merges) {
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ', 1);
      check(space != std::string::npos, where + ": merge '" + s + "' is not 'a b'");
      out.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else {
      check(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(), where + ": bad merge " + m.dump());
      out.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    }
  }
  return out;
}

}  // namespace

namespace {

std::unique_ptr<Tokenizer::Impl> impl_from_tokenizer_json(const json& j, const std::string& where) {
  auto impl = std::make_unique<Tokenizer::Impl>();
  check(j.is_object() && j.contains("model") && j["model"].is_object(), where + ": no 'model' (not a tokenizer.json?)");
  const json& model = j["model"];
  const std::string type = model.value("type", std::string("BPE"));
  check(type == "BPE", where + ": unsupported tokenizer model '" + type + "' (supported: BPE)");
  check(model.value("continuing_subword_prefix", json()).is_null() || model["continuing_subword_prefix"] == "",
        where + ": continuing_subword_prefix is not supported");
  check(model.value("end_of_word_suffix", json()).is_null() || model["end_of_word_suffix"] == "",
        where + ": end_of_word_suffix is not supported");
  check(model.contains("vocab") && model["vocab"].is_object(), where + ": model has no vocab");
  std::vector<std::string> vocab;
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    check(it.value().is_number_integer() && it.value().get<int64_t>() >= 0 && it.value().get<int64_t>() < (1 << 24),
          where + ": bad id for token " + json(it.key()).dump());
    const size_t id = it.value().get<size_t>();
    if (vocab.size() <= id) vocab.resize(id + 1);
    vocab[id] = it.key();
  }
  impl->bpe = std::make_unique<BpeModel>(std::move(vocab));
  impl->vocab_size = static_cast<int64_t>(impl->bpe->vocab().size());
  if (model.contains("merges")) impl->bpe->set_merges(parse_merges(model["merges"], where));
  impl->bpe->set_byte_fallback(model.value("byte_fallback", false));
  impl->bpe->set_ignore_merges(model.value("ignore_merges", false));
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    const int32_t unk = impl->bpe->find(model["unk_token"].get<std::string>());
    impl->bpe->set_unk(unk, model.value("fuse_unk", false));
  }
  if (j.contains("added_tokens")) {
    for (const json& t : j["added_tokens"]) {
      AddedToken a;
      a.content = t.at("content").get<std::string>();
      a.id = t.at("id").get<int32_t>();
      a.special = t.value("special", false);
      a.lstrip = t.value("lstrip", false);
      a.rstrip = t.value("rstrip", false);
      a.single_word = t.value("single_word", false);
      impl->added.push_back(a);
      impl->bpe->exclude_from_merges(a.id);
    }
  }
  impl->finish_added();
  add_normalizer(j.value("normalizer", json()), where, impl->normalizers);
  add_pre_tokenizer(j.value("pre_tokenizer", json()), where, impl->pre_tokenizers);
  add_decoder(j.value("decoder", json()), where, impl->decoders);
  add_post_processor(j.value("post_processor", json()), where, *impl, impl->prefix_ids, impl->suffix_ids);
  return impl;
}

bool looks_like_tiktoken(const std::string& path) {
  const std::string head = read_text_file(path).substr(0, 256);
  const size_t nl = head.find('\n');
  if (nl == std::string::npos) return false;
  const std::string line = head.substr(0, nl);
  const size_t space = line.find(' ');
  if (space == std::string::npos || space == 0) return false;
  for (size_t i = 0; i < space; ++i) {
    const char c = line[i];
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '/' || c == '=')) return false;
  }
  for (size_t i = space + 1; i < line.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(line[i]))) return false;
  return true;
}

std::string base64_decode(const std::string& in, const std::string& where) {
  static const std::string chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t buf = 0;
  int bits = 0;
  for (char c : in) {
    if (c == '=') break;
    const size_t v = chars.find(c);
    check(v != std::string::npos, where + ": bad base64 token '" + in + "'");
    buf = buf << 6 | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((buf >> bits) & 0xff);
    }
  }
  return out;
}

// The Llama 3 special tokens as Meta's reference tokenizer defines them.
std::vector<std::string> llama3_special_tokens() {
  std::vector<std::string> s = {"<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                                "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|reserved_special_token_4|>", "<|eot_id|>"};
  for (int i = 5; i < 256 - 5; ++i) s.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  return s;
}

std::unique_ptr<Tokenizer::Impl> impl_from_tiktoken(const std::string& path) {
  auto impl = std::make_unique<Tokenizer::Impl>();
  const std::string text = read_text_file(path);
  std::vector<std::string> vocab;
  std::vector<int64_t> ranks;
  size_t pos = 0;
  int64_t line_no = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (line.empty()) continue;
    const size_t space = line.find(' ');
    check(space != std::string::npos, path + ": line " + std::to_string(line_no) + " is not 'base64 rank'");
    const std::string bytes = base64_decode(line.substr(0, space), path);
    int64_t rank = -1;
    try {
      rank = std::stoll(line.substr(space + 1));
    } catch (const std::exception&) {
    }
    check(rank >= 0 && rank < (1 << 24), path + ": line " + std::to_string(line_no) + " has a bad rank");
    std::string mapped;
    for (char c : bytes) mapped += unicode::byte_to_unicode(static_cast<uint8_t>(c));
    if (vocab.size() <= static_cast<size_t>(rank)) {
      vocab.resize(static_cast<size_t>(rank) + 1);
      ranks.resize(static_cast<size_t>(rank) + 1, -1);
    }
    vocab[static_cast<size_t>(rank)] = mapped;
    ranks[static_cast<size_t>(rank)] = rank;
  }
  check(!vocab.empty(), path + ": empty tiktoken file");
  impl->bpe = std::make_unique<BpeModel>(vocab);
  impl->bpe->set_ranks_from_vocab(ranks);
  impl->bpe->set_ignore_merges(true);  // tiktoken looks a whole piece up before merging
  impl->vocab_size = static_cast<int64_t>(vocab.size());
  PreTokenizerStep split{};
  split.kind = PreTokenizerStep::Split;
  split.regex = std::make_shared<RegexSplitter>(kLlama3Pattern, false, SplitBehavior::Isolated, false);
  impl->pre_tokenizers.push_back(split);
  PreTokenizerStep bytes{};
  bytes.kind = PreTokenizerStep::ByteLevel;
  impl->pre_tokenizers.push_back(bytes);
  impl->decoders.push_back(DecoderStep{DecoderStep::ByteLevel, "", "", 0, 0, true});
  // Special tokens: from tokenizer_config.json beside the file when present, else Meta's list.
  const std::string cfg_path = dir_of(path) + "/tokenizer_config.json";
  if (is_file(cfg_path)) {
    const json cfg = parse_json_file(cfg_path);
    if (cfg.contains("added_tokens_decoder") && cfg["added_tokens_decoder"].is_object()) {
      for (auto it = cfg["added_tokens_decoder"].begin(); it != cfg["added_tokens_decoder"].end(); ++it) {
        AddedToken a;
        a.id = std::stoi(it.key());
        a.content = it.value().at("content").get<std::string>();
        a.special = it.value().value("special", true);
        a.lstrip = it.value().value("lstrip", false);
        a.rstrip = it.value().value("rstrip", false);
        impl->added.push_back(a);
      }
    }
  }
  if (impl->added.empty()) {
    const auto names = llama3_special_tokens();
    for (size_t i = 0; i < names.size(); ++i) impl->added.push_back({names[i], static_cast<int32_t>(vocab.size() + i), true});
  }
  impl->finish_added();
  for (const AddedToken& a : impl->added)
    if (a.content == "<|begin_of_text|>") impl->prefix_ids = {a.id};
  return impl;
}

std::unique_ptr<Tokenizer::Impl> impl_from_gpt2_files(const std::string& dir) {
  const json encoder = parse_json_file(dir + "/encoder.json");
  check(encoder.is_object(), dir + "/encoder.json: expected an object of token -> id");
  std::vector<std::string> vocab;
  for (auto it = encoder.begin(); it != encoder.end(); ++it) {
    const size_t id = it.value().get<size_t>();
    if (vocab.size() <= id) vocab.resize(id + 1);
    vocab[id] = it.key();
  }
  const std::string merges_text = read_text_file(dir + "/vocab.bpe");
  std::vector<std::pair<std::string, std::string>> merges;
  size_t pos = 0;
  while (pos < merges_text.size()) {
    size_t nl = merges_text.find('\n', pos);
    if (nl == std::string::npos) nl = merges_text.size();
    std::string line = merges_text.substr(pos, nl - pos);
    pos = nl + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line.rfind("#version", 0) == 0) continue;
    const size_t space = line.find(' ', 1);
    check(space != std::string::npos, dir + "/vocab.bpe: merge line '" + line + "' is not 'a b'");
    merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }
  auto impl = std::make_unique<Tokenizer::Impl>();
  // The GPT-2 file format does not name its split pattern: a Llama-3-sized vocabulary (>= 128000)
  // is taken to be Llama 3's (Llama 3.2 is shipped in this format), anything else GPT-2's.
  const bool llama3 = vocab.size() >= 128000;
  impl->bpe = std::make_unique<BpeModel>(std::move(vocab));
  impl->bpe->set_merges(merges);
  impl->bpe->set_ignore_merges(llama3);
  impl->vocab_size = static_cast<int64_t>(impl->bpe->vocab().size());
  PreTokenizerStep split{};
  split.kind = PreTokenizerStep::Split;
  split.regex = std::make_shared<RegexSplitter>(llama3 ? kLlama3Pattern : kGpt2Pattern, false, SplitBehavior::Isolated, false);
  impl->pre_tokenizers.push_back(split);
  PreTokenizerStep bytes{};
  bytes.kind = PreTokenizerStep::ByteLevel;
  impl->pre_tokenizers.push_back(bytes);
  impl->decoders.push_back(DecoderStep{DecoderStep::ByteLevel, "", "", 0, 0, true});
  // The GPT-2 file format carries no special tokens, so none are added or recognised.
  impl->finish_added();
  return impl;
}

std::unique_ptr<Tokenizer::Impl> impl_from_sentencepiece(const std::string& path) {
  auto impl = std::make_unique<Tokenizer::Impl>();
  impl->spm = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = impl->spm->Load(path);
  check(status.ok(), path + ": not a valid SentencePiece model (" + std::string(status.message()) + ")");
  impl->vocab_size = impl->spm->GetPieceSize();
  if (impl->spm->bos_id() >= 0) impl->prefix_ids = {impl->spm->bos_id()};
  return impl;
}

// SentencePiece BPE from pieces + scores (GGUF "llama" vocabularies, llama2.c tokenizer.bin):
// merges by piece score, byte fallback, "▁" for spaces and one leading "▁" per text segment.
void setup_sentencepiece_bpe(Tokenizer::Impl& impl, const std::vector<float>& scores, const std::vector<int32_t>& types,
                             bool add_space_prefix) {
  impl.sentencepiece_bpe = Tokenizer::Impl::SentencePieceBpe{scores, types, add_space_prefix};
  impl.bpe->set_scores(scores);
  impl.bpe->set_byte_fallback(true);
  for (size_t i = 0; i < types.size(); ++i)
    if (types[i] == 2) impl.bpe->set_unk(static_cast<int32_t>(i), false);
  if (add_space_prefix) impl.normalizers.push_back({NormalizerStep::Prepend, kSpace, ""});
  impl.normalizers.push_back({NormalizerStep::Replace, " ", kSpace});
  impl.decoders.push_back(DecoderStep{DecoderStep::Replace, kSpace, " ", 0, 0, true});
  impl.decoders.push_back(DecoderStep{DecoderStep::ByteFallback, "", "", 0, 0, true});
  impl.decoders.push_back(DecoderStep{DecoderStep::Fuse, "", "", 0, 0, true});
  if (add_space_prefix) impl.decoders.push_back(DecoderStep{DecoderStep::Strip, " ", "", 1, 0, true});
}

// llama2.c's tokenizer.bin: i32 max_token_length, then per token f32 score, i32 length, bytes.
// The export wrote "▁" as " " and <s>/</s> as "\n<s>\n"/"\n</s>\n"; ids 0, 1, 2 are unk, bos, eos.
std::unique_ptr<Tokenizer::Impl> impl_from_llama2c(const std::string& path) {
  const std::string data = read_text_file(path);
  check(data.size() >= 4, path + ": truncated llama2.c tokenizer");
  size_t pos = 4;
  std::vector<std::string> vocab;
  std::vector<float> scores;
  std::vector<int32_t> types;
  while (pos < data.size()) {
    check(data.size() - pos >= 8, path + ": truncated llama2.c tokenizer (token " + std::to_string(vocab.size()) + ")");
    float score;
    int32_t len;
    std::memcpy(&score, data.data() + pos, 4);
    std::memcpy(&len, data.data() + pos + 4, 4);
    pos += 8;
    check(len >= 0 && static_cast<size_t>(len) <= data.size() - pos, path + ": token " + std::to_string(vocab.size()) + " runs past the end");
    std::string piece = data.substr(pos, static_cast<size_t>(len));
    pos += static_cast<size_t>(len);
    const size_t id = vocab.size();
    int32_t type = 1;
    if (id == 0) {
      piece = "<unk>", type = 2;
    } else if (id == 1) {
      piece = "<s>", type = 3;
    } else if (id == 2) {
      piece = "</s>", type = 3;
    } else if (piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>') {
      type = 6;
    } else {
      replace_all(piece, " ", kSpace);
    }
    vocab.push_back(piece);
    scores.push_back(score);
    types.push_back(type);
  }
  check(vocab.size() > 3, path + ": not a llama2.c tokenizer (no tokens)");
  auto impl = std::make_unique<Tokenizer::Impl>();
  impl->bpe = std::make_unique<BpeModel>(vocab);
  for (size_t i = 0; i < types.size(); ++i)
    if (types[i] != 1) impl->bpe->exclude_from_merges(static_cast<int32_t>(i));
  impl->vocab_size = static_cast<int64_t>(vocab.size());
  // llama2.c matches no special-token text, like sentencepiece itself.
  setup_sentencepiece_bpe(*impl, scores, types, true);
  impl->prefix_ids = {1};
  impl->finish_added();
  return impl;
}

}  // namespace

namespace {

// A llama2.c checkpoint holds no vocabulary: run.c reads tokenizer.bin (or the file given with -z).
// Beside the checkpoint: tokenizer.bin, else the one tok*.bin there.
std::string llama2c_tokenizer_beside(const std::string& checkpoint) {
  const std::filesystem::path dir = std::filesystem::path(checkpoint).parent_path();
  const std::filesystem::path named = dir / "tokenizer.bin";
  if (std::filesystem::is_regular_file(named)) return named.string();
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir.empty() ? "." : dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && name.rfind("tok", 0) == 0 && ends_with(name, ".bin")) found.push_back(entry.path().string());
  }
  check(found.size() == 1, checkpoint + ": a llama2.c checkpoint has no vocabulary; put its tokenizer.bin beside it" +
                               (found.size() > 1 ? " (found several tok*.bin)" : ""));
  return found.front();
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  std::string dir = dir_of(path);
  std::string file = path;
  if (is_dir(path)) {
    dir = path;
    if (is_file(path + "/tokenizer.json")) {
      file = path + "/tokenizer.json";
    } else if (is_file(path + "/tokenizer.model")) {
      file = path + "/tokenizer.model";
    } else if (is_file(path + "/encoder.json") && is_file(path + "/vocab.bpe")) {
      file = path + "/encoder.json";
    } else {
      throw Error(path + ": no tokenizer.json, tokenizer.model or encoder.json + vocab.bpe");
    }
  }
  check(is_file(file), file + ": no such file");
  if (is_gguf_path(file)) return tokenizer_from_gguf(GgufFile(file));
  if (is_llama2c_checkpoint(file)) file = llama2c_tokenizer_beside(file);
  if (ends_with(file, ".bin")) {
    tok->impl_ = impl_from_llama2c(file);
    tok->kind_ = "llama2.c tokenizer.bin (SentencePiece BPE)";
    tok->bos_id_ = 1;
    tok->eos_id_ = 2;
    tok->bos_token_ = "<s>";
    tok->eos_token_ = "</s>";
    return tok;
  }
  if (ends_with(file, "encoder.json")) {
    tok->impl_ = impl_from_gpt2_files(dir);
    tok->kind_ = "GPT-2 files (encoder.json + vocab.bpe)";
  } else if (ends_with(file, ".json")) {
    tok->impl_ = impl_from_tokenizer_json(parse_json_file(file), file);
    tok->kind_ = "tokenizer.json (BPE)";
  } else if (looks_like_tiktoken(file)) {
    tok->impl_ = impl_from_tiktoken(file);
    tok->kind_ = "tiktoken (Llama 3)";
  } else {
    tok->impl_ = impl_from_sentencepiece(file);
    tok->kind_ = "SentencePiece";
  }
  read_tokenizer_config(dir, *tok, tok->chat_template_, tok->bos_token_, tok->eos_token_);
  // BOS/EOS ids: from the declared names, else the post-processor's first token / SentencePiece's ids.
  if (!tok->bos_token_.empty()) tok->bos_id_ = tok->token_id(tok->bos_token_);
  if (!tok->eos_token_.empty()) tok->eos_id_ = tok->token_id(tok->eos_token_);
  if (!tok->bos_id_ && !tok->impl_->prefix_ids.empty()) tok->bos_id_ = tok->impl_->prefix_ids.front();
  if (tok->impl_->spm) {
    if (!tok->eos_id_ && tok->impl_->spm->eos_id() >= 0) tok->eos_id_ = tok->impl_->spm->eos_id();
  }
  if (tok->bos_id_ && tok->bos_token_.empty()) tok->bos_token_ = tok->token_text(*tok->bos_id_);
  if (tok->eos_id_ && tok->eos_token_.empty()) tok->eos_token_ = tok->token_text(*tok->eos_id_);
  return tok;
}

// GGUF vocabularies: tokenizer.ggml.model "llama" (SentencePiece BPE with scores) or "gpt2"
// (byte-level BPE with merges and a pre-tokenizer named by tokenizer.ggml.pre).
std::unique_ptr<Tokenizer> tokenizer_from_gguf(const GgufFile& g) {
  const std::string where = g.path();
  const json& md = g.metadata();
  check(g.has("tokenizer.ggml.model"), where + ": no tokenizer.ggml.model (no embedded vocabulary)");
  const std::string model = g.get_string("tokenizer.ggml.model");
  check(md.contains("tokenizer.ggml.tokens") && md["tokenizer.ggml.tokens"].is_array(), where + ": no tokenizer.ggml.tokens");
  std::vector<std::string> vocab;
  for (const json& t : md["tokenizer.ggml.tokens"]) {
    check(t.is_string(), where + ": tokenizer.ggml.tokens must be strings");
    vocab.push_back(t.get<std::string>());
  }
  std::vector<int32_t> types(vocab.size(), 1);
  if (md.contains("tokenizer.ggml.token_type")) {
    const json& tt = md["tokenizer.ggml.token_type"];
    check(tt.is_array() && tt.size() == vocab.size(), where + ": tokenizer.ggml.token_type does not match the tokens");
    for (size_t i = 0; i < vocab.size(); ++i) types[i] = tt[i].get<int32_t>();
  }
  auto tok = std::unique_ptr<Tokenizer>(new Tokenizer());
  auto impl = std::make_unique<Tokenizer::Impl>();
  impl->bpe = std::make_unique<BpeModel>(vocab);
  impl->vocab_size = static_cast<int64_t>(vocab.size());
  // token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. GGUF files come
  // from HF models, whose tokenizers declare unknown and control tokens (<unk>, <s>, chat markers) as
  // special added tokens, recognised in text with special handling as HF and llama.cpp do;
  // user-defined ones are non-special added tokens, matched in any mode.
  for (size_t i = 0; i < vocab.size(); ++i) {
    const int32_t type = types[i];
    if (type != 1) impl->bpe->exclude_from_merges(static_cast<int32_t>(i));
    if (type == 2 || type == 3 || type == 4) impl->added.push_back({vocab[i], static_cast<int32_t>(i), type != 4});
  }
  if (model == "llama") {
    check(md.contains("tokenizer.ggml.scores") && md["tokenizer.ggml.scores"].size() == vocab.size(),
          where + ": tokenizer.ggml.scores missing or of the wrong length");
    std::vector<float> scores;
    for (const json& s : md["tokenizer.ggml.scores"]) scores.push_back(s.get<float>());
    setup_sentencepiece_bpe(*impl, scores, types, md.value("tokenizer.ggml.add_space_prefix", true));
    tok->kind_ = "GGUF vocabulary (SentencePiece BPE)";
  } else if (model == "gpt2") {
    check(md.contains("tokenizer.ggml.merges") && md["tokenizer.ggml.merges"].is_array(), where + ": no tokenizer.ggml.merges");
    impl->bpe->set_merges(parse_merges(md["tokenizer.ggml.merges"], where));
    const std::string pre = md.value("tokenizer.ggml.pre", std::string("default"));
    impl->gguf_pre = pre;
    std::vector<std::string> patterns;
    if (pre == "default" || pre == "gpt-2" || pre == "gpt2") {
      patterns = {kGpt2Pattern};
    } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
      patterns = {kLlama3Pattern};
      impl->bpe->set_ignore_merges(true);
    } else if (pre == "qwen2") {
      patterns = {kQwen2Pattern};
    } else if (pre == "deepseek-llm") {
      // DeepSeek-LLM's split sequence (llama.cpp LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM), written with
      // escapes so no editor can normalise its Greek / letterlike code points.
      patterns = {R"([\r\n])",
                  R"(\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+)",
                  R"(\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+)", R"(\s+$)", R"([\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+)", R"(\p{N}+)"};
    } else {
      throw Error(where + ": unsupported pre-tokenizer '" + pre + "' (supported: gpt-2, llama-bpe, qwen2, deepseek-llm)");
    }
    for (const std::string& p : patterns) {
      PreTokenizerStep split{};
      split.kind = PreTokenizerStep::Split;
      split.regex = std::make_shared<RegexSplitter>(p, false, SplitBehavior::Isolated, false);
      impl->pre_tokenizers.push_back(split);
    }
    PreTokenizerStep bytes{};
    bytes.kind = PreTokenizerStep::ByteLevel;
    impl->pre_tokenizers.push_back(bytes);
    impl->decoders.push_back(DecoderStep{DecoderStep::ByteLevel, "", "", 0, 0, true});
    tok->kind_ = "GGUF vocabulary (byte-level BPE, pre-tokenizer " + pre + ")";
  } else {
    throw Error(where + ": unsupported tokenizer.ggml.model '" + model + "' (supported: llama, gpt2)");
  }
  impl->finish_added();
  auto id_of = [&](const char* key) -> std::optional<int32_t> {
    if (!md.contains(key) || !md[key].is_number_integer()) return std::nullopt;
    const int64_t id = md[key].get<int64_t>();
    check(id >= 0 && id < static_cast<int64_t>(vocab.size()), where + ": " + key + " is outside the vocabulary");
    return static_cast<int32_t>(id);
  };
  tok->bos_id_ = id_of("tokenizer.ggml.bos_token_id");
  tok->eos_id_ = id_of("tokenizer.ggml.eos_token_id");
  const bool add_bos = md.value("tokenizer.ggml.add_bos_token", model == "llama");
  const bool add_eos = md.value("tokenizer.ggml.add_eos_token", false);
  if (add_bos && tok->bos_id_) impl->prefix_ids = {*tok->bos_id_};
  if (add_eos && tok->eos_id_) impl->suffix_ids = {*tok->eos_id_};
  if (md.contains("tokenizer.chat_template") && md["tokenizer.chat_template"].is_string())
    tok->chat_template_ = md["tokenizer.chat_template"].get<std::string>();
  tok->impl_ = std::move(impl);
  if (tok->bos_id_) tok->bos_token_ = tok->token_text(*tok->bos_id_);
  if (tok->eos_id_) tok->eos_token_ = tok->token_text(*tok->eos_id_);
  return tok;
}

}  // namespace bioquant
