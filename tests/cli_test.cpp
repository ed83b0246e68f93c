// The CLI contract: JSON shapes, and one-line `error:` messages with a non-zero exit for bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace bioquant {
namespace {

using nlohmann::json;
using test::run_cli;
using test::TempDir;

// Exactly one line on stderr, starting "error:", containing `needle`; non-zero exit; nothing on stdout.
void expect_clean_error(const test::CliResult& r, const std::string& needle) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_LT(r.exit_code, 128) << "crashed";
  EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "not one line: " << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

TEST(Cli, EverySubcommandHasHelp) {
  for (const char* sub : {"info", "logits", "generate", "bench"}) {
    const auto r = run_cli({sub, "--help"});
    EXPECT_EQ(r.exit_code, 0) << sub;
    EXPECT_NE(r.out.find("--model"), std::string::npos) << sub;
  }
  const auto top = run_cli({"--help"});
  EXPECT_EQ(top.exit_code, 0);
  EXPECT_NE(top.out.find("generate"), std::string::npos);
}

TEST(Cli, LogitsAndGenerateFollowTheContract) {
  TempDir dir;
  test::write_tiny_llama(dir.path());
  const auto r = run_cli({"logits", "--model", dir.path(), "--tokens", "1,5,9,20", "--last", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["n_vocab"], 64);
  ASSERT_EQ(j["argmax"].size(), 4u);
  ASSERT_EQ(j["logits"].size(), 2u);
  ASSERT_EQ(j["logits"][1].size(), 64u);
  // argmax of the last position agrees with the last logits row.
  const auto& last = j["logits"][1];
  size_t best = 0;
  for (size_t i = 1; i < last.size(); ++i)
    if (last[i].get<float>() > last[best].get<float>()) best = i;
  EXPECT_EQ(j["argmax"][3].get<size_t>(), best);

  const auto g = run_cli({"generate", "--model", dir.path(), "--tokens", "1,5,9,20", "--max-new-tokens", "6",
                          "--ignore-eos", "--json"});
  ASSERT_EQ(g.exit_code, 0) << g.err;
  const json gj = json::parse(g.out);
  ASSERT_EQ(gj["tokens"].size(), 6u);
  EXPECT_TRUE(gj["text"].is_string());
  // Greedy generation's first token is the argmax after the prompt.
  EXPECT_EQ(gj["tokens"][0], j["argmax"][3]);

  // Seeded sampling is reproducible.
  const std::vector<std::string> sample = {"generate", "--model", dir.path(), "--tokens", "1,5", "--max-new-tokens",
                                           "8", "--ignore-eos", "--temperature", "1.5", "--top-k", "20",
                                           "--top-p", "0.9", "--seed", "7", "--json"};
  EXPECT_EQ(run_cli(sample).out, run_cli(sample).out);

  // Past the trained context (128 positions): generated, with a warning.
  EXPECT_EQ(g.err.find("warning"), std::string::npos) << g.err;
  const auto past = run_cli({"generate", "--model", dir.path(), "--tokens", "1,5", "--max-new-tokens", "130",
                             "--ignore-eos", "--json"});
  ASSERT_EQ(past.exit_code, 0) << past.err;
  EXPECT_EQ(json::parse(past.out)["tokens"].size(), 130u);
  EXPECT_NE(past.err.find("warning: the prompt (2 tokens) and --max-new-tokens 130 need 132 positions, more than the "
                          "model's 128"),
            std::string::npos)
      << past.err;
}

// llama.cpp's files are often named *.bin: a file that starts with GGUF's magic is read as GGUF whatever its name,
// and any other file gets an error that says what was expected.
TEST(Cli, GgufFilesAreKnownByTheirMagic) {
  TempDir dir;
  test::write_tiny_llama(dir.path());
  const std::string gguf = dir.file("m.gguf"), bin = dir.file("m.bin");
  ASSERT_EQ(run_cli({"quantize", "--model", dir.path(), "--type", "q8_0", "--out", gguf}).exit_code, 0);
  test::copy_file(gguf, bin);
  const auto a = run_cli({"logits", "--model", gguf, "--tokens", "1,5,9", "--last", "1"});
  const auto b = run_cli({"logits", "--model", bin, "--tokens", "1,5,9", "--last", "1"});
  ASSERT_EQ(a.exit_code, 0) << a.err;
  ASSERT_EQ(b.exit_code, 0) << b.err;
  EXPECT_EQ(a.out, b.out);
  expect_clean_error(run_cli({"estimate", "--model", bin}), "for a GGUF file use bioquant info");
  test::write_file(dir.file("notes.txt"), "not a model");
  expect_clean_error(run_cli({"info", "--model", dir.file("notes.txt")}),
                     "notes.txt: neither a GGUF file (it does not start with GGUF's magic), a llama2.c checkpoint (its "
                     "header does not match its size) nor a Hugging Face model directory");
  expect_clean_error(run_cli({"info", "--model", dir.file("gone")}), "gone: no such file or directory");
}

TEST(Cli, BadInputGivesOneLineErrors) {
  expect_clean_error(run_cli({"evaluate", "--model", "x"}),
                     "unknown command 'evaluate' (did you mean eval?) (commands: demo, info,");
  expect_clean_error(run_cli({"frobnicate"}), "unknown command 'frobnicate' (commands: demo, info,");
  // A mistyped option is named (before CLI11 would call a required option missing), with its likely spelling.
  expect_clean_error(run_cli({"info", "--modle", "x"}),
                     "unknown option '--modle' for bioquant info: did you mean --model? (bioquant info --help)");
  expect_clean_error(run_cli({"eval", "--model", "x", "--tasks", "hoc", "--limt=3"}),
                     "unknown option '--limt' for bioquant eval: did you mean --limit?");
  expect_clean_error(run_cli({"bench", "--synthetic", "tiny", "--frobnicate"}),
                     "unknown option '--frobnicate' for bioquant bench (bioquant bench --help)");
  expect_clean_error(run_cli({}), "give a command (commands: demo, info,");
  TempDir empty;
  expect_clean_error(run_cli({"info", "--model", empty.path()}), "no config.json");

  TempDir unknown;
  test::write_tiny_llama(unknown.path());
  std::string config = test::tiny_llama_config_json();
  config.replace(config.find("\"model_type\": \"llama\""), 21, "\"model_type\": \"mamba\"");
  test::write_file(unknown.file("config.json"), config);
  expect_clean_error(run_cli({"info", "--model", unknown.path()}), "unsupported model_type 'mamba'");

  TempDir truncated;
  test::write_tiny_llama(truncated.path());
  const std::string full = test::read_file(truncated.file("model.safetensors"));
  test::write_file(truncated.file("model.safetensors"), full.substr(0, full.size() / 2));
  expect_clean_error(run_cli({"logits", "--model", truncated.path(), "--tokens", "1"}), "past the end");

  TempDir header_past_end;
  test::write_tiny_llama(header_past_end.path());
  test::write_file(header_past_end.file("model.safetensors"), full.substr(0, 100));
  expect_clean_error(run_cli({"logits", "--model", header_past_end.path(), "--tokens", "1"}), "truncated");

  TempDir wrong_shape;
  test::write_tiny_llama(wrong_shape.path(), "", "model.layers.1.mlp.up_proj.weight");
  expect_clean_error(run_cli({"logits", "--model", wrong_shape.path(), "--tokens", "1"}),
                     "tensor 'model.layers.1.mlp.up_proj.weight' has shape [3, 3], config expects [64, 32]");

  TempDir missing;
  test::write_tiny_llama(missing.path(), "model.layers.0.self_attn.k_proj.weight");
  expect_clean_error(run_cli({"logits", "--model", missing.path(), "--tokens", "1"}),
                     "missing tensor 'model.layers.0.self_attn.k_proj.weight'");

  TempDir good;
  test::write_tiny_llama(good.path());
  expect_clean_error(run_cli({"logits", "--model", good.path(), "--tokens", "1,64"}), "token id 64 is outside the vocabulary");
  expect_clean_error(run_cli({"generate", "--model", good.path(), "--tokens", "1,2,x"}), "not an integer");
  expect_clean_error(run_cli({"logits", "--model", good.path(), "--tokens", "1", "--bogus"}), "--bogus");
  // A device past those present (none without a GPU or a CUDA build; this also holds on a GPU machine).
  expect_clean_error(run_cli({"logits", "--model", good.path(), "--tokens", "1", "--device", "cuda:99"}), "is not available");
  expect_clean_error(run_cli({"bench", "--synthetic", "gpt-9"}), "unknown synthetic model 'gpt-9'");

  TempDir bad_json;
  test::write_tiny_llama(bad_json.path());
  test::write_file(bad_json.file("config.json"), "{\"model_type\": ");
  expect_clean_error(run_cli({"info", "--model", bad_json.path()}), "not valid JSON");
}

TEST(Cli, BenchRunsOnASyntheticShape) {
  const auto r = run_cli({"bench", "--synthetic", "tiny", "-p", "16", "-n", "4", "-r", "1", "--threads", "1",
                          "--no-bandwidth", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_GT(j["pp_tokens_per_s"].get<double>(), 0.0);
  EXPECT_GT(j["tg_tokens_per_s"].get<double>(), 0.0);
  EXPECT_EQ(j["threads"], 1);
}

TEST(Cli, BenchDecodesGreedily) {
  // Two sequences, each fed its own top token: the row says so.
  const auto r = run_cli({"bench", "--synthetic", "tiny", "-p", "0", "-n", "4", "-b", "2", "-r", "1", "--threads", "1",
                          "--no-bandwidth", "--greedy"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("| tg4 x 2 seqs greedy |"), std::string::npos) << r.out;
  const auto j = run_cli({"bench", "--synthetic", "tiny", "-p", "0", "-n", "4", "-r", "1", "--threads", "1", "--no-bandwidth",
                          "--greedy", "--json"});
  ASSERT_EQ(j.exit_code, 0) << j.err;
  EXPECT_EQ(json::parse(j.out)["greedy"], true);
}

TEST(Cli, BenchMeasuresAtADepth) {
  // Each test starts with 24 tokens in the cache: they count against --ctx.
  const auto r = run_cli({"bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "-d", "24", "-r", "1", "--threads", "1",
                          "--no-bandwidth", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json j = json::parse(r.out);
  EXPECT_EQ(j["depth"], 24);
  EXPECT_GT(j["tg_tokens_per_s"].get<double>(), 0.0);
  const auto table = run_cli({"bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "-d", "24", "-r", "1", "--threads", "1",
                              "--no-bandwidth"});
  ASSERT_EQ(table.exit_code, 0) << table.err;
  EXPECT_NE(table.out.find("| tg4 @ d24 |"), std::string::npos) << table.out;
  expect_clean_error(run_cli({"bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "-d", "24", "--ctx", "30"}),
                     "--ctx 30 is smaller than the 33 positions the test needs");
  expect_clean_error(run_cli({"bench", "--synthetic", "tiny", "-p", "0", "-n", "0"}), "-p and -n are both 0");
  // A bad --quant fails before the (possibly large) synthetic model is built.
  const auto bad_quant = run_cli({"bench", "--synthetic", "tiny", "--quant", "q9"});
  expect_clean_error(bad_quant, "unknown quant type 'q9'");
  EXPECT_EQ(bad_quant.err.find("building synthetic"), std::string::npos) << bad_quant.err;
}

TEST(Cli, GpuMemoryLimitNeedsTheGpu) {
  expect_clean_error(run_cli({"bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "--gpu-memory", "40"}),
                     "--gpu-memory applies to --device cuda");
  expect_clean_error(run_cli({"bench", "--synthetic", "tiny", "-p", "8", "-n", "4", "--gpu-memory", "-1"}), "--gpu-memory");
}

// Out-of-range numbers name what was expected (CLI11's own checks printed the largest double, 300
// digits, as the range's end), and infinities and NaNs are out of range too.
TEST(Cli, NumberChecksSayWhatTheyExpected) {
  const auto bench = [](std::initializer_list<std::string> extra) {
    std::vector<std::string> args{"bench", "--synthetic", "tiny", "-p", "8", "-n", "4"};
    args.insert(args.end(), extra);
    return run_cli(args);
  };
  expect_clean_error(bench({"--gpu-memory", "0"}), "--gpu-memory: expected a number above 0, got '0'");
  expect_clean_error(bench({"--gpu-memory", "inf"}), "--gpu-memory: expected a number above 0, got 'inf'");
  expect_clean_error(bench({"--gpu-memory", "nan"}), "--gpu-memory: expected a number above 0, got 'nan'");
  expect_clean_error(bench({"-r", "0"}), "--repetitions: expected a number above 0, got '0'");
  expect_clean_error(bench({"--threads", "-1"}), "--threads: expected a number of 0 or more, got '-1'");
  expect_clean_error(bench({"-p", "12x"}), "--n-prompt: expected a number of 0 or more, got '12x'");
  for (const auto& r : {bench({"-r", "0"}), bench({"--threads", "-2"})})
    EXPECT_LT(r.err.size(), 120u) << r.err;
  expect_clean_error(run_cli({"generate", "--model", "x", "--tokens", "1", "--temperature", "-1"}),
                     "--temperature: expected a number of 0 or more, got '-1'");
}

}  // namespace
}  // namespace bioquant
