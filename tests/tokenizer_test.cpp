// Tokenizer units: a hand-built BPE, streaming decode, and clean errors for bad files.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "bioquant/tokenizer/unicode.h"
#include "test_util.h"

namespace bioquant {
namespace {

using test::TempDir;

// A byte-level BPE small enough to work out by hand.
const char* kTinyTokenizerJson = R"({
  "version": "1.0",
  "added_tokens": [{"id": 9, "content": "<s>", "special": true, "lstrip": false, "rstrip": false,
                    "single_word": false, "normalized": false}],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [9], "tokens": ["<s>"]}}},
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
    "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5, "Ġa": 6, "bc": 7, "Ġab": 8},
    "merges": ["a b", "Ġ a", "ab c", "Ġa b", "b c"]}
})";

// The one UTF-8 encoder (tokenizers, chat templates, output parsers): each length's boundary values, and
// next_code_point reading back every code point it writes.
TEST(UnicodeUtf8, EncodesEachLengthAndReadsBack) {
  const std::pair<uint32_t, std::string> cases[] = {
      {0x24, "$"},           {0x7F, "\x7F"},         {0x80, "\xC2\x80"},         {0xA2, "\xC2\xA2"},
      {0x7FF, "\xDF\xBF"}, {0x800, "\xE0\xA0\x80"}, {0x20AC, "\xE2\x82\xAC"}, {0xFFFF, "\xEF\xBF\xBF"},
      {0x10000, "\xF0\x90\x80\x80"}, {0x10348, "\xF0\x90\x8D\x88"}, {0x10FFFF, "\xF4\x8F\xBF\xBF"}};
  for (const auto& [cp, bytes] : cases) {
    std::string out = "x";
    unicode::append_utf8(out, cp);
    EXPECT_EQ(out, "x" + bytes) << std::hex << cp;
    EXPECT_EQ(unicode::utf8_length(static_cast<unsigned char>(bytes[0])), static_cast<int>(bytes.size())) << std::hex << cp;
  }
  std::string all;
  std::vector<uint32_t> written;
  for (uint32_t cp = 1; cp <= 0x10FFFF; cp += cp < 0x1000 ? 1 : 97) {
    if (cp >= 0xD800 && cp <= 0xDFFF) continue;  // surrogates are not characters
    unicode::append_utf8(all, cp);
    written.push_back(cp);
  }
  size_t i = 0;
  for (const uint32_t cp : written) ASSERT_EQ(unicode::next_code_point(all, i), cp);
  EXPECT_EQ(i, all.size());
}

TEST(Tokenizer, HandWorkedByteLevelBpe) {
  TempDir dir;
  test::write_file(dir.file("tokenizer.json"), kTinyTokenizerJson);
  auto tok = load_tokenizer(dir.path());
  // "abc ab bc": pieces "abc", " ab", " bc" (GPT-2 regex); " " maps to "Ġ".
  //   abc: a b -> ab (rank 0), ab c -> abc (rank 2)            => [5]
  //   Ġab: "a b" (rank 0) beats "Ġ a" (rank 1) -> Ġ + ab; no "Ġ ab" merge => [3, 4]
  //   Ġbc: only "b c" applies (rank 4)                                  => [3, 7]
  //   "Ġa" alone: "Ġ a" (rank 1)                                        => [6]
  EXPECT_EQ(tok->encode("abc ab bc", false), (std::vector<int32_t>{5, 3, 4, 3, 7}));
  EXPECT_EQ(tok->encode("abc ab bc", true), (std::vector<int32_t>{9, 5, 3, 4, 3, 7}));
  EXPECT_EQ(tok->encode("c a", false), (std::vector<int32_t>{2, 6}));
  // "<s>" is special text: split out with special handling, plain characters without.
  EXPECT_EQ(tok->encode("a<s>b", true), (std::vector<int32_t>{9, 0, 9, 1}));
  EXPECT_EQ(tok->decode({5, 3, 4, 3, 7}), "abc ab bc");
  EXPECT_EQ(tok->decode({8}), " ab");
  EXPECT_EQ(tok->decode({9, 5}, true), "abc");
  EXPECT_EQ(tok->vocab_size(), 10);
}

TEST(Tokenizer, StreamingNeverEmitsHalfACharacter) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  auto tok = load_tokenizer(test::shared_dir() + "/tokenizers/llama3/tokenizer.model");
  const std::string text = "µg ≥ 5 °C, TNF-α 🧬🧪 中文 done";
  const auto ids = tok->encode(text, false);
  StreamDecoder stream(*tok);
  std::string joined;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    EXPECT_EQ(unicode::complete_utf8_prefix(piece), piece.size()) << "half a character emitted";
    EXPECT_EQ(unicode::to_valid_utf8(piece), piece);
    joined += piece;
  }
  joined += stream.finish();
  EXPECT_EQ(joined, text);
}

std::string error_of(const std::string& path) {
  try {
    load_tokenizer(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Tokenizer, CorruptOrUnsupportedFilesGiveErrors) {
  TempDir dir;
  test::write_file(dir.file("bad.json"), "{\"model\": ");
  EXPECT_NE(error_of(dir.file("bad.json")).find("not valid JSON"), std::string::npos);
  test::write_file(dir.file("wp.json"), R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_NE(error_of(dir.file("wp.json")).find("unsupported tokenizer model 'WordPiece'"), std::string::npos);
  std::string json = kTinyTokenizerJson;
  json.replace(json.find("\"b c\"]"), 6, "\"b q\"]");
  test::write_file(dir.file("merge.json"), json);
  EXPECT_NE(error_of(dir.file("merge.json")).find("not in the vocabulary"), std::string::npos);
  test::write_file(dir.file("garbage.model"), std::string("\x0a\x05\xff\xff\x01\x02", 6));
  EXPECT_NE(error_of(dir.file("garbage.model")).find("not a valid SentencePiece model"), std::string::npos);
  test::write_file(dir.file("tiktoken.model"), "IQ== 0\nIg== 1\n!!!! 2\n");
  EXPECT_NE(error_of(dir.file("tiktoken.model")).find("bad base64"), std::string::npos);
  test::write_file(dir.file("x.gguf"), "GGUF\x03");
  EXPECT_NE(error_of(dir.file("x.gguf")).find("truncated GGUF"), std::string::npos);
  test::write_file(dir.file("y.gguf"), "GGML0000000000000000000000");
  EXPECT_NE(error_of(dir.file("y.gguf")).find("bad magic"), std::string::npos);
  EXPECT_NE(error_of(dir.file("missing")).find("no such file"), std::string::npos);
  EXPECT_NE(error_of(dir.path()).find("no tokenizer.json"), std::string::npos);
  if (!test::shared_dir().empty()) {
    // A vocabulary GGUF cut short.
    const std::string full = test::read_file(test::shared_dir() + "/tokenizers/gguf-vocab/ggml-vocab-gpt-2.gguf");
    test::write_file(dir.file("cut.gguf"), full.substr(0, full.size() / 3));
    EXPECT_NE(error_of(dir.file("cut.gguf")).find("truncated GGUF"), std::string::npos);
  }
  for (const char* f : {"bad.json", "wp.json", "garbage.model", "x.gguf"}) {
    const auto r = test::run_cli({"tokenize", "--model", dir.file(f), "--text", "hi"});
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;
  }
}

TEST(Tokenizer, CliTokenizeJson) {
  TempDir dir;
  test::write_file(dir.file("tokenizer.json"), kTinyTokenizerJson);
  const auto r = test::run_cli({"tokenize", "--model", dir.path(), "--text", "abc ab bc", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "{\"ids\":[9,5,3,4,3,7]}\n");
  const auto plain = test::run_cli({"tokenize", "--model", dir.path(), "--text", "abc ab bc", "--no-special", "--json"});
  EXPECT_EQ(plain.out, "{\"ids\":[5,3,4,3,7]}\n");
  // --file: JSON lines (CRLF too; blank lines skipped), each a string or {"text": ...}; an id list a line.
  test::write_file(dir.file("texts.jsonl"), "\"abc ab bc\"\r\n\r\n{\"text\": \"ab\"}\r\n");
  const auto lines = test::run_cli({"tokenize", "--model", dir.path(), "--file", dir.file("texts.jsonl"), "--no-special"});
  ASSERT_EQ(lines.exit_code, 0) << lines.err;
  EXPECT_EQ(lines.out, "{\"ids\":[5,3,4,3,7]}\n{\"ids\":[4]}\n");
  test::write_file(dir.file("bad.jsonl"), "\"ab\"\n{\"text\": 5}\n");
  auto bad = test::run_cli({"tokenize", "--model", dir.path(), "--file", dir.file("bad.jsonl")});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_EQ(bad.err, "error: " + dir.file("bad.jsonl") + ":2: not a string or {\"text\": string}\n");
  test::write_file(dir.file("bad.jsonl"), "\"ab\"\n\n\"cut\n");
  bad = test::run_cli({"tokenize", "--model", dir.path(), "--file", dir.file("bad.jsonl")});
  EXPECT_EQ(bad.err, "error: " + dir.file("bad.jsonl") + ":3: not valid JSON (expected a string or {\"text\": string})\n");
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

TEST(Tokenizer, GenerateWithPromptAndChatTemplate) {
  TempDir dir;
  test::write_tiny_llama(dir.path());  // vocab 64 covers the tiny tokenizer's 10 ids
  test::write_file(dir.file("tokenizer.json"), kTinyTokenizerJson);
  test::write_file(dir.file("tokenizer_config.json"),
                   R"({"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim }} {% endfor %}{% if add_generation_prompt %}c{% endif %}"})");
  const auto r = test::run_cli({"generate", "--model", dir.path(), "--prompt", "  ab ", "--chat", "--show-prompt",
                                "--max-new-tokens", "3", "--ignore-eos", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err.rfind("<s>ab c\n", 0), 0u) << r.err;  // the rendered template comes first on stderr
  const auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j["tokens"].size(), 3u);
  auto tok = load_tokenizer(dir.path());
  EXPECT_EQ(j["text"], tok->decode(j["tokens"].get<std::vector<int32_t>>(), true));
  // The rendered "<s>" became the BOS id and nothing was added twice.
  EXPECT_EQ(tok->encode("<s>ab c", false, true), (std::vector<int32_t>{9, 4, 3, 2}));
  const auto plain = test::run_cli({"generate", "--model", dir.path(), "--prompt", "ab", "--max-new-tokens", "2"});
  EXPECT_EQ(plain.exit_code, 0) << plain.err;
}

}  // namespace
}  // namespace bioquant
