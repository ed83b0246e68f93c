#include "bioquant/tokenizer/bpe.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <queue>
#include <tuple>

#include "bioquant/core/error.h"
#include "bioquant/tokenizer/unicode.h"

namespace bioquant {

BpeModel::BpeModel(std::vector<std::string> vocab) : vocab_(std::move(vocab)), excluded_(vocab_.size(), false) {
  ids_.reserve(vocab_.size());
  for (size_t i = 0; i < vocab_.size(); ++i) ids_.emplace(vocab_[i], static_cast<int32_t>(i));  // first id wins
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    byte_tokens_[b] = find(name);
  }
}

int32_t BpeModel::find(std::string_view token) const {
  auto it = ids_.find(std::string(token));
  return it == ids_.end() ? -1 : it->second;
}

std::vector<std::pair<std::string, std::string>> BpeModel::merges_in_order() const {
  std::vector<std::tuple<int64_t, int32_t, int32_t>> order;
  order.reserve(pairs_.size());
  for (const auto& [key, info] : pairs_)
    order.emplace_back(info.rank, static_cast<int32_t>(key >> 32), static_cast<int32_t>(key & 0xffffffffu));
  std::sort(order.begin(), order.end());
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(order.size());
  for (const auto& [rank, a, b] : order) out.emplace_back(vocab_[static_cast<size_t>(a)], vocab_[static_cast<size_t>(b)]);
  return out;
}

void BpeModel::exclude_from_merges(int32_t id) {
  if (id >= 0 && static_cast<size_t>(id) < excluded_.size()) excluded_[static_cast<size_t>(id)] = true;
}

void BpeModel::add_pair(int32_t a, int32_t b, int64_t rank, int32_t merged) {
  auto [it, inserted] = pairs_.emplace(pair_key(a, b), PairInfo{rank, merged});
  if (!inserted && rank < it->second.rank) it->second = PairInfo{rank, merged};
}

void BpeModel::set_merges(const std::vector<std::pair<std::string, std::string>>& merges) {
  pairs_.clear();
  pairs_.reserve(merges.size());
  for (size_t r = 0; r < merges.size(); ++r) {
    const int32_t a = find(merges[r].first), b = find(merges[r].second);
    const int32_t m = find(merges[r].first + merges[r].second);
    check(a >= 0 && b >= 0 && m >= 0, "tokenizer: merge '" + merges[r].first + " " + merges[r].second +
                                          "' uses a token that is not in the vocabulary");
    add_pair(a, b, static_cast<int64_t>(r), m);
  }
}

void BpeModel::build_pairs_from_ranks(const std::vector<int64_t>& rank_of_id) {
  // A token is reachable as the merge of any (prefix, suffix) split into two known tokens.
  pairs_.clear();
  for (size_t id = 0; id < vocab_.size(); ++id) {
    if (excluded_[id] || rank_of_id[id] < 0) continue;
    const std::string& t = vocab_[id];
    for (size_t cut = 1; cut < t.size(); ++cut) {
      // Only cut at character boundaries: symbols are whole characters.
      if ((static_cast<unsigned char>(t[cut]) & 0xc0) == 0x80) continue;
      const int32_t a = find(std::string_view(t).substr(0, cut));
      const int32_t b = find(std::string_view(t).substr(cut));
      if (a >= 0 && b >= 0) add_pair(a, b, rank_of_id[id], static_cast<int32_t>(id));
    }
  }
}

void BpeModel::set_ranks_from_vocab(const std::vector<int64_t>& rank_of_id) {
  check(rank_of_id.size() == vocab_.size(), "tokenizer: rank table size mismatch");
  build_pairs_from_ranks(rank_of_id);
}

void BpeModel::set_scores(const std::vector<float>& scores) {
  check(scores.size() == vocab_.size(), "tokenizer: score table size mismatch");
  // Dense ranks by descending score, so equal scores tie and fall back to position.
  std::map<float, int64_t, std::greater<float>> dense;
  for (float s : scores) dense.emplace(s, 0);
  int64_t r = 0;
  for (auto& [score, rank] : dense) rank = r++;
  std::vector<int64_t> rank_of_id(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) rank_of_id[i] = dense[scores[i]];
  build_pairs_from_ranks(rank_of_id);
}

void BpeModel::encode(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    const int32_t whole = find(word);
    if (whole >= 0) {
      out.push_back(whole);
      return;
    }
  }
  // Initial symbols: characters, or their bytes / unk when the character is not a token.
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  size_t i = 0;
  while (i < word.size()) {
    const size_t start = i;
    unicode::next_code_point(word, i);
    const std::string_view ch = word.substr(start, i - start);
    const int32_t id = find(ch);
    if (id >= 0) {
      sym.push_back({id, 0, 0});
    } else if (byte_fallback_ && std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_tokens_[static_cast<uint8_t>(c)] >= 0; })) {
      for (char c : ch) sym.push_back({byte_tokens_[static_cast<uint8_t>(c)], 0, 0});
    } else {
      check(unk_id_ >= 0, "tokenizer: character not in the vocabulary and no unknown token to stand for it");
      if (fuse_unk_ && !sym.empty() && sym.back().id == unk_id_) continue;
      sym.push_back({unk_id_, 0, 0});
    }
  }
  const int n = static_cast<int>(sym.size());
  for (int k = 0; k < n; ++k) {
    sym[static_cast<size_t>(k)].prev = k - 1;
    sym[static_cast<size_t>(k)].next = k + 1 < n ? k + 1 : -1;
  }
  struct Candidate {
    int64_t rank;
    int left;
    int32_t left_id, right_id, merged;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto consider = [&](int left) {
    if (left < 0) return;
    const int right = sym[static_cast<size_t>(left)].next;
    if (right < 0) return;
    const int32_t a = sym[static_cast<size_t>(left)].id, b = sym[static_cast<size_t>(right)].id;
    auto it = pairs_.find(pair_key(a, b));
    if (it == pairs_.end() || excluded_[static_cast<size_t>(it->second.merged)]) return;
    queue.push({it->second.rank, left, a, b, it->second.merged});
  };
  for (int k = 0; k + 1 < n; ++k) consider(k);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = sym[static_cast<size_t>(c.left)];
    // Stale entry: one side has been merged away or changed since it was queued.
    if (left.id != c.left_id || left.next < 0 || sym[static_cast<size_t>(left.next)].id != c.right_id) continue;
    Symbol& right = sym[static_cast<size_t>(left.next)];
    left.id = c.merged;
    right.id = -1;  // dead
    left.next = right.next;
    if (right.next >= 0) sym[static_cast<size_t>(right.next)].prev = c.left;
    consider(left.prev);
    consider(c.left);
  }
  for (int k = 0; k >= 0; k = sym[static_cast<size_t>(k)].next) out.push_back(sym[static_cast<size_t>(k)].id);
}

}  // namespace bioquant
