// Text <-> token ids, reproducing the reference tokenizers exactly:
//   tokenizer.json (HF tokenizers: BPE, byte-level or SentencePiece-style with byte fallback),
//   tokenizer.model (SentencePiece protobuf via libsentencepiece, or Llama 3's tiktoken text file),
//   encoder.json + vocab.bpe (GPT-2 files), and vocabularies embedded in GGUF files.
// One pipeline, configured by the loaders: added tokens -> normaliser -> pre-tokeniser -> model
// -> post-processor; decoding runs the declared decoder steps.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace bioquant {

class GgufFile;
struct GgufWriteValue;

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = true;
  bool lstrip = false, rstrip = false, single_word = false;
};

class Tokenizer {
 public:
  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // add_special: add BOS/EOS as the tokenizer declares and recognise special-token text.
  // false: add nothing, and special-token text is tokenised as ordinary text.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const {
    return encode(text, add_special, add_special);
  }
  // The two halves apart: add BOS/EOS, and recognise special-token text (a chat template's
  // output is encoded with add_special=false, parse_special=true, as transformers does).
  std::vector<int32_t> encode(std::string_view text, bool add_special, bool parse_special) const;
  // Valid UTF-8 (invalid byte sequences become U+FFFD). skip_special drops special tokens.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  int64_t vocab_size() const;
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  std::optional<int32_t> token_id(std::string_view token) const;  // vocab or added token
  std::string token_text(int32_t id) const;                       // as stored in the vocabulary
  bool is_special(int32_t id) const;
  const std::string& kind() const { return kind_; }        // e.g. "tokenizer.json/BPE byte-level"
  const std::string& chat_template() const { return chat_template_; }  // "" when none shipped
  const std::string& bos_token() const { return bos_token_; }
  // tokenizer.ggml.* keys describing this tokenizer for a GGUF file: SentencePiece models as
  // "llama" (pieces, scores, types), byte-level BPE as "gpt2" (tokens, types, merges, pre-tokenizer
  // name). Empty when the tokenizer has no GGUF description (the file is then written without one).
  std::vector<std::pair<std::string, GgufWriteValue>> gguf_metadata() const;
  const std::string& eos_token() const { return eos_token_; }

  struct Impl;

 private:
  friend std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);
  friend std::unique_ptr<Tokenizer> tokenizer_from_gguf(const GgufFile& gguf);
  Tokenizer();

  std::unique_ptr<Impl> impl_;
  std::optional<int32_t> bos_id_, eos_id_;
  std::string bos_token_, eos_token_;
  std::string kind_;
  std::string chat_template_;
};

// PATH: a model directory (tokenizer.json, else tokenizer.model, else encoder.json + vocab.bpe),
// a tokenizer.json, a tokenizer.model (SentencePiece or tiktoken), or a .gguf file.
// Throws Error with a one-line message for missing, corrupt or unsupported files.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);
std::unique_ptr<Tokenizer> tokenizer_from_gguf(const GgufFile& gguf);

// Turns a stream of ids into text pieces without ever emitting half a UTF-8 character.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = true)
      : tokenizer_(tokenizer), skip_special_(skip_special) {}
  std::string push(int32_t id);  // text that became final with this token (maybe "")
  std::string finish();          // whatever is left

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t emitted_ = 0;
};

}  // namespace bioquant
