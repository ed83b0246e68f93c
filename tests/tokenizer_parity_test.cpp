// Token ids identical to the reference tokenizers (HF tokenizers, SentencePiece, tiktoken) on
// the biomedical corpus + edge cases. References: tests/fixtures/tokenizers/*.json, made by
// tools/make_tokenizer_fixtures.py on the GPU machine. The corpus is rebuilt here from
// ../shared/bionlp with the same rule as the script (see its header); each text's sha256 prefix
// is checked first so an extraction difference can't pass for a tokenizer difference.
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "bioquant/core/hash.h"
#include "bioquant/io/gguf.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "bioquant/tokenizer/unicode.h"
#include "test_util.h"

namespace bioquant {
namespace {

using nlohmann::json;

std::vector<std::string> lines_of(const std::string& path) {
  const std::string text = test::read_file(path);
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    std::string line = text.substr(pos, nl - pos);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
    if (nl == text.size()) break;
    pos = nl + 1;
  }
  if (!lines.empty() && lines.back().empty() && !text.empty() && text.back() == '\n') lines.pop_back();
  return lines;
}

std::vector<std::string> split_tabs(const std::string& line) {
  std::vector<std::string> fields;
  size_t pos = 0;
  for (;;) {
    const size_t tab = line.find('\t', pos);
    fields.push_back(line.substr(pos, tab == std::string::npos ? std::string::npos : tab - pos));
    if (tab == std::string::npos) break;
    pos = tab + 1;
  }
  return fields;
}

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c); });
}

// The corpus rule of tools/make_tokenizer_fixtures.py.
std::vector<std::string> build_corpus(const std::string& bionlp) {
  std::vector<std::string> texts;
  for (const char* ner : {"BC5CDR-chem", "NCBI-disease"}) {
    std::string sentence;
    bool open = false;
    for (const std::string& line : lines_of(bionlp + "/" + ner + "/sample200.tsv")) {
      if (blank(line)) {
        if (open) texts.push_back(sentence);
        sentence.clear();
        open = false;
        continue;
      }
      sentence += (open ? " " : "") + split_tabs(line)[0];
      open = true;
    }
    if (open) texts.push_back(sentence);
  }
  const std::vector<std::pair<const char*, std::vector<size_t>>> tables = {
      {"ChemProt", {1}}, {"DDI2013", {1}}, {"HoC", {1}}, {"LitCovid", {1}}, {"PubMedQA", {0, 1, 8}}};
  for (const auto& [dir, columns] : tables) {
    const auto lines = lines_of(bionlp + "/" + dir + "/sample200.tsv");
    for (size_t i = 1; i < lines.size(); ++i) {
      if (lines[i].empty()) continue;
      const auto fields = split_tabs(lines[i]);
      for (size_t c : columns)
        if (c < fields.size() && !fields[c].empty()) texts.push_back(fields[c]);
    }
  }
  for (const std::string& line : lines_of(bionlp + "/MedQA/test.jsonl")) {
    if (line.empty()) continue;
    const json q = json::parse(line);
    std::string text = q["question"].get<std::string>() + "\n";
    std::vector<std::string> keys;
    for (auto it = q["options"].begin(); it != q["options"].end(); ++it) keys.push_back(it.key());
    std::sort(keys.begin(), keys.end());
    for (size_t k = 0; k < keys.size(); ++k) text += (k ? "\n" : "") + keys[k] + ". " + q["options"][keys[k]].get<std::string>();
    texts.push_back(text);
  }
  return texts;
}

std::string fnv64(const std::vector<int32_t>& ids) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int32_t id : ids) {
    const uint32_t v = static_cast<uint32_t>(id);
    for (int b = 0; b < 4; ++b) {
      h ^= (v >> (8 * b)) & 0xff;
      h *= 0x100000001b3ull;
    }
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// sha256 prefix (16 hex digits), enough to tell the corpora apart.
std::string sha256_prefix(const std::string& text) { return sha256_hex(text).substr(0, 16); }

std::vector<std::string> fixture_names() {
  std::vector<std::string> names;
  const std::string dir = test::fixtures_dir() + "/tokenizers";
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string n = e->d_name;
      if (n.size() > 5 && n.compare(n.size() - 5, 5, ".json") == 0) names.push_back(n.substr(0, n.size() - 5));
    }
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string resolve_source(std::string source) {
  const std::string gpt2_files = "/encoder.json+vocab.bpe";  // a GPT-2-format directory
  if (source.size() > gpt2_files.size() && source.compare(source.size() - gpt2_files.size(), gpt2_files.size(), gpt2_files) == 0)
    source.erase(source.size() - gpt2_files.size());
  const std::string local = test::fixtures_dir() + "/tokenizers/" + source;
  if (std::FILE* f = std::fopen(local.c_str(), "r")) {
    std::fclose(f);
    return local;
  }
  struct stat st {};
  if (::stat(local.c_str(), &st) == 0) return local;
  return test::shared_dir() + "/" + source;
}

class TokenizerParity : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerParity, IdsEqualTheReference) {
  json fx = json::parse(test::read_file(test::fixtures_dir() + "/tokenizers/" + GetParam() + ".json"));
  const std::string source = fx["source"];
  if (fx.contains("same_as")) {  // another file of the same vocabulary: the same references
    fx = json::parse(test::read_file(test::fixtures_dir() + "/tokenizers/" + fx["same_as"].get<std::string>() + ".json"));
  }
  if (test::shared_dir().empty() && source.rfind("tokenizers/", 0) == 0) GTEST_SKIP() << "../shared not present";
  std::vector<std::string> texts;
  if (fx.value("corpus_count", 0) > 0) {
    ASSERT_FALSE(test::shared_dir().empty()) << "../shared/bionlp is needed for the corpus";
    texts = build_corpus(test::shared_dir() + "/bionlp");
    ASSERT_EQ(static_cast<int64_t>(texts.size()), fx["corpus_count"].get<int64_t>()) << "corpus rule differs";
  }
  for (const json& e : fx["edge_cases"]) texts.push_back(e.get<std::string>());
  const json& entries = fx["entries"];
  ASSERT_EQ(entries.size(), texts.size());
  auto tok = load_tokenizer(resolve_source(source));
  size_t mismatches = 0, roundtrip_failures = 0, checked = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const json& e = entries[i];
    ASSERT_EQ(sha256_prefix(texts[i]), e["sha"].get<std::string>()) << "corpus text " << i << " differs from the script's";
    for (const char* mode : {"special", "plain"}) {
      if (!e.contains(mode)) continue;
      const auto ids = tok->encode(texts[i], std::string(mode) == "special");
      ++checked;
      const bool same = static_cast<int64_t>(ids.size()) == e[mode][0].get<int64_t>() && fnv64(ids) == e[mode][1].get<std::string>();
      if (!same) {
        if (++mismatches <= 5) {
          std::ostringstream got;
          for (int32_t id : ids) got << id << ",";
          std::string want = "(hash only)";
          const std::string key = std::to_string(i);
          if (fx.contains("full") && fx["full"].contains(key) && fx["full"][key].contains(mode))
            want = fx["full"][key][mode].dump();
          ADD_FAILURE() << GetParam() << " " << mode << " text " << i << " " << json(texts[i].substr(0, 120)).dump()
                        << "\n  got  " << got.str() << "\n  want " << want;
        }
      }
    }
    if (e.value("roundtrip", false)) {
      const auto ids = tok->encode(texts[i], false);
      if (tok->decode(ids) != texts[i] && ++roundtrip_failures <= 3)
        ADD_FAILURE() << GetParam() << " decode(encode(x)) != x for text " << i << ": " << json(tok->decode(ids)).dump();
    }
  }
  EXPECT_EQ(mismatches, 0u) << GetParam() << ": " << mismatches << " of " << checked << " encodings differ";
  EXPECT_EQ(roundtrip_failures, 0u);
  RecordProperty("texts", static_cast<int>(texts.size()));

  // A tokenizer that `quantize` embeds in a GGUF file (one with a GGUF description) must come back
  // from that file encoding the same, where GGUF's reading of a vocabulary is not llama.cpp's own:
  // plain text (a GGUF vocabulary's control tokens are special text, where a raw SentencePiece model
  // reads "<s>" as characters), NFC text (GGUF has no normalizer: a Qwen2 vocabulary from GGUF does
  // not compose), and no user-defined pieces (llama.cpp starts the text after one with a space).
  const auto metadata = tok->gguf_metadata();
  if (metadata.empty()) return;
  std::set<int32_t> user_defined;
  for (const auto& [key, value] : metadata)
    if (key == "tokenizer.ggml.token_type")
      for (size_t id = 0; id < value.value.size(); ++id)
        if (value.value[id] == 4) user_defined.insert(static_cast<int32_t>(id));
  test::TempDir dir;
  write_gguf(dir.file("vocab.gguf"), metadata, {});
  auto again = load_tokenizer(dir.file("vocab.gguf"));
  size_t differ = 0, compared = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto ids = tok->encode(texts[i], false);
    if (unicode::nfc(texts[i]) != texts[i] ||
        std::any_of(ids.begin(), ids.end(), [&](int32_t id) { return user_defined.count(id) > 0; }))
      continue;
    ++compared;
    if (again->encode(texts[i], false) != ids && ++differ <= 3)
      ADD_FAILURE() << GetParam() << " through GGUF, text " << i << " " << json(texts[i].substr(0, 120)).dump();
  }
  EXPECT_GT(compared, texts.size() * 9 / 10);
  EXPECT_EQ(differ, 0u) << GetParam() << ": the GGUF copy encodes " << differ << " texts differently";
  EXPECT_EQ(again->bos_id(), tok->bos_id());
  EXPECT_EQ(again->eos_id(), tok->eos_id());
}

INSTANTIATE_TEST_SUITE_P(Fixtures, TokenizerParity, ::testing::ValuesIn(fixture_names()),
                         [](const auto& info) {
                           std::string n = info.param;
                           for (char& c : n)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(TokenizerParity);

}  // namespace
}  // namespace bioquant
