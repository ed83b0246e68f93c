// Byte-pair encoding over symbols, the model behind HF BPE (merge ranks), tiktoken
// (rank of the merged bytes) and SentencePiece BPE (score of the merged piece): all three reduce
// to "repeatedly merge the adjacent pair of best priority, leftmost first".
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace bioquant {

class BpeModel {
 public:
  // How the text of a pre-token is cut into initial symbols.
  enum class Symbols {
    Chars,  // one symbol per UTF-8 character (HF BPE, SentencePiece)
  };

  // vocab[id] = token text (as stored: byte-level mapped, or with "▁").
  explicit BpeModel(std::vector<std::string> vocab);

  // Merge priorities: HF merges (rank = position in the list) ...
  void set_merges(const std::vector<std::pair<std::string, std::string>>& merges);
  // ... or every vocab entry ranked by itself (tiktoken: rank = id order given) ...
  void set_ranks_from_vocab(const std::vector<int64_t>& rank_of_id);
  // ... (SentencePiece: higher score first, equal scores tie by position).
  void set_scores(const std::vector<float>& scores);

  void set_byte_fallback(bool on) { byte_fallback_ = on; }
  void set_unk(int32_t id, bool fuse) {
    unk_id_ = id;
    fuse_unk_ = fuse;
  }
  void set_ignore_merges(bool on) { ignore_merges_ = on; }  // a pre-token found whole in the vocab is one token
  // Ids that must never be produced by merging (control / special pieces).
  void exclude_from_merges(int32_t id);

  // Encodes one pre-token (already normalised / byte-mapped), appending ids.
  void encode(std::string_view word, std::vector<int32_t>& out) const;

  const std::vector<std::string>& vocab() const { return vocab_; }
  // Every merge as (left, right) token text, in priority order (for writing GGUF / tokenizer.json).
  std::vector<std::pair<std::string, std::string>> merges_in_order() const;
  int32_t find(std::string_view token) const;  // -1 if absent
  int32_t byte_token(uint8_t b) const { return byte_tokens_[b]; }  // <0xAB> piece, -1 if absent

 private:
  struct PairInfo {
    int64_t rank;
    int32_t merged;
  };
  static uint64_t pair_key(int32_t a, int32_t b) {
    return static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b);
  }
  void add_pair(int32_t a, int32_t b, int64_t rank, int32_t merged);
  void build_pairs_from_ranks(const std::vector<int64_t>& rank_of_id);

  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<uint64_t, PairInfo> pairs_;
  std::vector<bool> excluded_;
  int32_t byte_tokens_[256];
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
};

}  // namespace bioquant
