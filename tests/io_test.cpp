// safetensors and config.json: valid files load, every malformed one is rejected with a message.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "bioquant/core/error.h"
#include "bioquant/io/gguf.h"
#include "bioquant/io/hf_config.h"
#include "bioquant/io/json_lines.h"
#include "bioquant/io/llama2c.h"
#include "bioquant/io/safetensors.h"
#include "bioquant/kernels/cpu/ops.h"
#include "test_util.h"

namespace bioquant {
namespace {

using test::TempDir;

// 8-byte length + header text + data bytes.
std::string raw_safetensors(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  return out + header + data;
}

std::string error_of(const std::string& path) {
  try {
    SafetensorsFile f(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, WriteThenReadRoundTrips) {
  TempDir dir;
  const float a[6] = {1, 2, 3, 4, 5, 6};
  const uint16_t b[2] = {0x3f80, 0xc000};
  TensorView ta{"a", DType::F32, {2, 3}, reinterpret_cast<const uint8_t*>(a), sizeof a, -1, ""};
  TensorView tb{"b", DType::BF16, {2}, reinterpret_cast<const uint8_t*>(b), sizeof b, -1, ""};
  write_safetensors(dir.file("m.safetensors"), {tb, ta});
  SafetensorsFile f(dir.file("m.safetensors"));
  ASSERT_EQ(f.tensors().size(), 2u);
  const TensorView* va = f.find("a");
  ASSERT_NE(va, nullptr);
  EXPECT_EQ(va->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(va->data, a, sizeof a), 0);
  EXPECT_EQ(f.find("b")->dtype, DType::BF16);
  EXPECT_EQ(f.find("c"), nullptr);
}

TEST(Safetensors, RejectsMalformedFiles) {
  TempDir dir;
  const std::string p = dir.file("x.safetensors");
  const std::string good_header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Case {
    const char* what;
    std::string bytes;
    const char* expect;
  } cases[] = {
      {"empty file", "", "truncated"},
      {"header longer than file", raw_safetensors(good_header, "").substr(0, 20), "truncated"},
      {"data past the end", raw_safetensors(good_header, std::string(4, '\0')), "past the end"},
      {"not JSON", raw_safetensors("{nope", ""), "not valid JSON"},
      {"size vs shape", raw_safetensors(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "do not match shape"},
      {"unknown dtype", raw_safetensors(R"({"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')),
       "unknown dtype"},
      {"overlap", raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                  std::string(8, '\0')),
       "overlap"},
      {"duplicate name", raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                         std::string(8, '\0')),
       "listed twice"},
      {"negative offsets", raw_safetensors(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", std::string(8, '\0')),
       "data_offsets"},
  };
  for (const Case& c : cases) {
    test::write_file(p, c.bytes);
    const std::string err = error_of(p);
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.what << ": got '" << err << "'";
    EXPECT_EQ(err.find('\n'), std::string::npos) << c.what;
  }
  EXPECT_NE(error_of(dir.file("missing.safetensors")).find("cannot open"), std::string::npos);
}

TEST(HfConfig, ReadsBothRopeSpellingsTheSame) {
  const std::string v4 = R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,"rope_theta":500000.0,
    "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
    "original_max_position_embeddings":32},"eos_token_id":[2,3]})";
  const std::string v5 = R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":512,
    "rope_parameters":{"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
    "high_freq_factor":4.0,"original_max_position_embeddings":32},"eos_token_id":2})";
  for (const std::string* text : {&v4, &v5}) {
    const ModelConfig c = parse_hf_config(*text, "config.json");
    EXPECT_EQ(c.head_dim, 16);
    EXPECT_EQ(c.rope.type, RopeType::Llama3);
    EXPECT_FLOAT_EQ(c.rope.theta, 500000.0f);
    EXPECT_FLOAT_EQ(c.rope.factor, 8.0f);
    EXPECT_EQ(c.rope.original_max_positions, 32);
    EXPECT_EQ(c.eos_ids.front(), 2);
  }
  // The older `type` key of rope_scaling.
  std::string old = v4;
  old.replace(old.find("\"rope_type\""), 11, "\"type\"");
  EXPECT_EQ(parse_hf_config(old, "c").rope.type, RopeType::Llama3);
}

TEST(HfConfig, Llama3InverseFrequenciesFollowTheThreeBands) {
  RopeParams p;
  p.theta = 500000.0f;
  p.type = RopeType::Llama3;
  p.factor = 8.0f;
  p.low_freq_factor = 1.0f;
  p.high_freq_factor = 4.0f;
  p.original_max_positions = 32;
  float got[8];
  rope_inv_freq(p, 16, got);
  for (int i = 0; i < 8; ++i) {
    const double f = 1.0 / std::pow(500000.0, 2.0 * i / 16.0);
    const double wavelen = 2 * M_PI / f;
    double want = f;  // high frequencies (wavelength < 32 / 4) unchanged
    if (wavelen > 32.0) {
      want = f / 8.0;  // low frequencies slowed by the factor
    } else if (wavelen >= 8.0) {
      const double smooth = (32.0 / wavelen - 1.0) / 3.0;
      want = (1 - smooth) * f / 8.0 + smooth * f;
    }
    EXPECT_NEAR(got[i], want, 1e-6 * want) << "pair " << i;
  }
}

TEST(HfConfig, FamilyTraitsAndLayerTypes) {
  const ModelConfig g = parse_hf_config(R"({"model_type":"gemma2","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,"vocab_size":512,
    "query_pre_attn_scalar":24,"attn_logit_softcapping":2.0,"final_logit_softcapping":5.0,"sliding_window":8})",
                                        "g");
  EXPECT_TRUE(g.norm_unit_offset && g.sandwich_norms && g.embed_scale);
  EXPECT_TRUE(g.tie_embeddings);  // Gemma's default
  EXPECT_EQ(g.layer_sliding, (std::vector<bool>{true, false, true}));
  EXPECT_FLOAT_EQ(g.attention_scale(), 1.0f / std::sqrt(24.0f));
  const ModelConfig m = parse_hf_config(R"({"model_type":"mistral","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":512,"sliding_window":16,
    "layer_types":["full_attention","sliding_attention"]})",
                                        "m");
  EXPECT_EQ(m.n_kv_heads, 4);
  EXPECT_EQ(m.layer_sliding, (std::vector<bool>{false, true}));
  const ModelConfig q = parse_hf_config(R"({"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":512,"sliding_window":16,"use_sliding_window":false})",
                                        "q");
  EXPECT_TRUE(q.attn_qkv_bias);
  EXPECT_EQ(q.layer_sliding, (std::vector<bool>{false, false}));
  const ModelConfig p = parse_hf_config(R"({"model_type":"phi3","hidden_size":64,"intermediate_size":128,
    "num_hidden_layers":2,"num_attention_heads":4,"vocab_size":512,"partial_rotary_factor":0.5})",
                                        "p");
  EXPECT_TRUE(p.fused_qkv && p.fused_gate_up);
  EXPECT_EQ(p.rotary_dim(), 8);
}

TEST(HfConfig, RejectsBadConfigs) {
  auto error_of = [](const std::string& text) -> std::string {
    try {
      parse_hf_config(text, "config.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of("{").find("not valid JSON"), std::string::npos);
  EXPECT_NE(error_of("[]").find("JSON object"), std::string::npos);
  EXPECT_NE(error_of(R"({"hidden_size":1})").find("model_type"), std::string::npos);
  EXPECT_NE(error_of(R"({"model_type":"gpt_neox"})").find("unsupported model_type 'gpt_neox'"), std::string::npos);
  EXPECT_NE(error_of(R"({"model_type":"llama","hidden_size":64})").find("missing 'intermediate_size'"), std::string::npos);
  EXPECT_NE(error_of(R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"vocab_size":512,"rope_scaling":{"rope_type":"dynamic","factor":4}})")
                .find("unsupported RoPE type 'dynamic'"),
            std::string::npos);
  EXPECT_NE(error_of(R"({"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"num_key_value_heads":3,"vocab_size":512})")
                .find("multiple"),
            std::string::npos);
  // longrope: both factor lists, one value per rotated pair (head_dim 16 at factor 0.5: 4 pairs).
  const std::string phi = R"({"model_type":"phi3","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"vocab_size":512,"partial_rotary_factor":0.5,"original_max_position_embeddings":16,
    "rope_scaling":)";
  EXPECT_EQ(error_of(phi + R"({"type":"longrope","short_factor":[1,1,1,1]}})"),
            "config.json: longrope needs a list 'long_factor'");
  EXPECT_EQ(error_of(phi + R"({"type":"longrope","short_factor":[1,1,1,1],"long_factor":[1,2,0,4]}})"),
            "config.json: 'long_factor' must hold positive numbers");
  EXPECT_EQ(error_of(phi + R"({"type":"longrope","short_factor":[1,1,1,1],"long_factor":[1,2,4]}})"),
            "config.json: longrope short_factor and long_factor need 4 values each (rotary dimension / 2), not 4 and 3");
}

// Phi-3.5 / Phi-4-mini longrope: the scale of the context (max / original) sets the attention factor
// unless the config gives it; "su" is its first name; each factor divides its pair's frequency.
TEST(HfConfig, LongRopeFactorsAndAttentionFactor) {
  const std::string head = R"({"model_type":"phi3","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"vocab_size":512,"max_position_embeddings":131072,"original_max_position_embeddings":4096,
    "rope_theta":10000.0,"rope_scaling":{"type":")";
  const std::string lists = R"(","short_factor":[1,1.5,2,2.5,3,3.5,4,4.5],"long_factor":[2,3,4,5,6,7,8,9])";
  const ModelConfig c = parse_hf_config(head + "longrope" + lists + "}}", "c");
  ASSERT_EQ(c.rope.type, RopeType::LongRope);
  EXPECT_EQ(c.rope.original_max_positions, 4096);
  EXPECT_FLOAT_EQ(c.rope.attention_factor, static_cast<float>(std::sqrt(1.0 + std::log(32.0) / std::log(4096.0))));
  EXPECT_NEAR(c.rope.attention_factor, 1.19024f, 1e-5f);  // Phi-3.5-mini's, as llama.cpp's converter writes it
  EXPECT_EQ(parse_hf_config(head + "su" + lists + "}}", "c").rope.type, RopeType::LongRope);
  EXPECT_FLOAT_EQ(parse_hf_config(head + "longrope" + lists + R"(,"attention_factor":1.5}})", "c").rope.attention_factor,
                  1.5f);
  float short_freq[8], long_freq[8];
  rope_inv_freq(c.rope, 16, short_freq);
  rope_inv_freq(c.rope, 16, long_freq, true);
  for (int i = 0; i < 8; ++i) {
    const double base = std::pow(10000.0, 2.0 * i / 16.0);
    EXPECT_NEAR(short_freq[i], 1.0 / ((1.0 + 0.5 * i) * base), 1e-6 / base) << i;
    EXPECT_NEAR(long_freq[i], 1.0 / ((2.0 + i) * base), 1e-6 / base) << i;
  }
  // YaRN: a factor is required; DeepSeek-style mscale / mscale_all_dim set the attention factor's ratio.
  const std::string yarn = R"({"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
    "num_attention_heads":4,"vocab_size":512,"max_position_embeddings":32768,"rope_scaling":{"type":"yarn")";
  EXPECT_EQ(test::error_of([&] { parse_hf_config(yarn + "}}", "config.json"); }),
            "config.json: yarn needs a positive 'factor'");
  const ModelConfig y = parse_hf_config(yarn + R"(,"factor":4,"mscale":1,"mscale_all_dim":0.5}})", "c");
  EXPECT_EQ(y.rope.type, RopeType::Yarn);
  EXPECT_EQ(y.rope.original_max_positions, 32768);  // max_position_embeddings when not given
  EXPECT_FLOAT_EQ(y.rope.attention_factor, static_cast<float>((0.1 * std::log(4.0) + 1) / (0.05 * std::log(4.0) + 1)));
  // The long factors from the step whose last position + 1 passes the original context.
  EXPECT_FALSE(rope_long_step(c.rope, 4095));
  EXPECT_TRUE(rope_long_step(c.rope, 4096));
  RopeParams plain;
  EXPECT_FALSE(rope_long_step(plain, 1 << 20));
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

TEST(Gguf, WriteThenReadRoundTrips) {
  test::TempDir dir;
  const float w[64] = {1.0f, -2.0f, 3.5f};
  std::vector<std::pair<std::string, GgufWriteValue>> md = {
      {"general.architecture", {GgufValueType::STRING, GgufValueType::U8, "llama"}},
      {"llama.block_count", {GgufValueType::U32, GgufValueType::U8, 2}},
      {"tokenizer.ggml.tokens", {GgufValueType::ARRAY, GgufValueType::STRING, nlohmann::json::array({"a", "b"})}},
      {"tokenizer.ggml.scores", {GgufValueType::ARRAY, GgufValueType::F32, nlohmann::json::array({0.5, -1.0})}},
      {"x.flag", {GgufValueType::BOOL, GgufValueType::U8, true}}};
  std::vector<GgufWriteTensor> tensors = {{"w", {32, 2}, 0, reinterpret_cast<const uint8_t*>(w), sizeof w},
                                          {"v", {3}, 0, reinterpret_cast<const uint8_t*>(w), 12}};
  write_gguf(dir.file("m.gguf"), md, tensors);
  GgufFile g(dir.file("m.gguf"));
  EXPECT_EQ(g.version(), 3u);
  EXPECT_EQ(g.get_string("general.architecture"), "llama");
  EXPECT_EQ(g.get_int("llama.block_count"), 2);
  EXPECT_EQ(g.type_of("llama.block_count"), GgufValueType::U32);
  EXPECT_EQ(g.metadata()["tokenizer.ggml.tokens"][1], "b");
  EXPECT_FLOAT_EQ(g.metadata()["tokenizer.ggml.scores"][0].get<float>(), 0.5f);
  EXPECT_EQ(g.metadata()["x.flag"], true);
  ASSERT_EQ(g.tensors().size(), 2u);
  const GgufTensorInfo* t = g.find_tensor("w");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->dims, (std::vector<uint64_t>{32, 2}));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % 32, reinterpret_cast<uintptr_t>(g.find_tensor("v")->data) % 32);
  EXPECT_EQ(std::memcmp(t->data, w, sizeof w), 0);
  EXPECT_EQ(std::memcmp(g.find_tensor("v")->data, w, 12), 0);
}

TEST(Gguf, ReadsTheSharedTinyModelAndRejectsDamage) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  const std::string path = test::shared_dir() + "/models/llama-2-tiny-random-gguf/llama-2-tiny-random.gguf";
  GgufFile g(path);
  EXPECT_EQ(g.get_string("general.architecture"), "llama");
  EXPECT_EQ(g.tensors().size(), 12u);
  EXPECT_EQ(g.get_int("llama.embedding_length"), 8);
  EXPECT_EQ(g.metadata()["tokenizer.ggml.tokens"].size(), 32000u);
  test::TempDir dir;
  const std::string full = test::read_file(path);
  auto error_of = [](const std::string& p) -> std::string {
    try {
      GgufFile f(p);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  test::write_file(dir.file("cut.gguf"), full.substr(0, full.size() - 100));
  EXPECT_NE(error_of(dir.file("cut.gguf")).find("past the end"), std::string::npos);
  test::write_file(dir.file("head.gguf"), full.substr(0, 1000));
  EXPECT_NE(error_of(dir.file("head.gguf")).find("truncated GGUF"), std::string::npos);
  std::string bad_version = full;
  bad_version[4] = 9;
  test::write_file(dir.file("v.gguf"), bad_version);
  EXPECT_NE(error_of(dir.file("v.gguf")).find("unsupported GGUF version 9"), std::string::npos);
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

TEST(Gguf, SharedTinyLlamaModelLoadsAndRuns) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  const std::string path = test::shared_dir() + "/models/llama-2-tiny-random-gguf/llama-2-tiny-random.gguf";
  const auto r = test::run_cli({"logits", "--model", path, "--tokens", "1,15043,3186", "--last", "1"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["n_vocab"], 32000);
  ASSERT_EQ(j["logits"][0].size(), 32000u);
  for (const auto& v : j["logits"][0]) ASSERT_TRUE(std::isfinite(v.get<float>()));
  // The embedded vocabulary tokenizes like the Llama 2 SentencePiece model it carries.
  const auto t = test::run_cli({"tokenize", "--model", path, "--text", "Hello world", "--json"});
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(t.out, "{\"ids\":[1,15043,3186]}\n");
}

// A real trained llama2.c checkpoint (../shared/models/aidreams260K, PROVENANCE.md): its greedy ids from
// BOS are those of an independent float64 forward pass of run.c's arithmetic.
TEST(Llama2c, TrainedCheckpointGivesTheReferenceGreedyIds) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  const std::string dir = test::shared_dir() + "/models/aidreams260K";
  const std::string model = dir + "/aidreams260K.bin";
  ASSERT_TRUE(is_llama2c_checkpoint(model));
  EXPECT_FALSE(is_llama2c_checkpoint(dir + "/tok512.bin"));
  const std::vector<int> reference = {319, 459, 355, 260, 275, 429, 339, 315, 374, 327,
                                      446, 262, 421, 392, 275, 280, 269, 440, 270, 283};
  auto r = test::run_cli({"generate", "--model", model, "--tokens", "1", "--max-new-tokens", "20", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"].get<std::vector<int>>(), reference);
  // The tokenizer beside it (tok512.bin) decodes them.
  EXPECT_EQ(j["text"].get<std::string>().rfind("\"Echoes of vectors unfold, a gentle hum of precision", 0), 0u) << j["text"];
  const auto info = test::run_cli({"info", "--model", model});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("llama, 4 layers, hidden 64, ffn 172, heads 4/4 (head_dim 16), vocab 512"), std::string::npos)
      << info.out;
  // To GGUF (q8_0 where rows fill blocks) with its tokenizer embedded: the same ids, the same text.
  test::TempDir tmp;
  const auto q = test::run_cli({"quantize", "--model", model, "--type", "q8_0", "--out", tmp.file("aid.gguf")});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_EQ(q.err.find("none embedded"), std::string::npos) << q.err;
  r = test::run_cli({"generate", "--model", tmp.file("aid.gguf"), "--tokens", "1", "--max-new-tokens", "20", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json g = nlohmann::json::parse(r.out);
  EXPECT_EQ(g["tokens"].get<std::vector<int>>(), reference);
  EXPECT_EQ(g["text"], j["text"]);
}

TEST(Llama2c, BadCheckpointsAndMissingTokenizersAreOneLineErrors) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  const std::string full = test::read_file(test::shared_dir() + "/models/aidreams260K/aidreams260K.bin");
  test::TempDir dir;
  // Cut short: its header no longer matches its size.
  test::write_file(dir.file("cut.bin"), full.substr(0, full.size() - 4));
  EXPECT_FALSE(is_llama2c_checkpoint(dir.file("cut.bin")));
  auto r = test::run_cli({"info", "--model", dir.file("cut.bin")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("a llama2.c checkpoint (its header does not match its size)"), std::string::npos) << r.err;
  // Whole, but no tokenizer beside it: the model runs on ids, text needs its tokenizer.bin.
  test::write_file(dir.file("model.bin"), full);
  r = test::run_cli({"logits", "--model", dir.file("model.bin"), "--tokens", "1,319", "--last", "1"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  r = test::run_cli({"generate", "--model", dir.file("model.bin"), "--prompt", "Echoes", "--max-new-tokens", "2"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("put its tokenizer.bin beside it"), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = test::run_cli({"estimate", "--model", dir.file("model.bin")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("for a llama2.c checkpoint use bioquant info"), std::string::npos) << r.err;
}

TEST(JsonLines, SkipsBlankLinesAcceptsCrlfAndNamesEachLine) {
  std::vector<std::string> seen;
  io::for_each_json_line("{\"a\": 1}\r\n\n  \t\r\n\"two\"\r\n[3]", "f.jsonl",
                         [&](nlohmann::json& v, const std::string& where) { seen.push_back(where + " " + v.dump()); });
  EXPECT_EQ(seen, (std::vector<std::string>{"f.jsonl:1 {\"a\":1}", "f.jsonl:4 \"two\"", "f.jsonl:5 [3]"}));
  seen.clear();
  io::for_each_json_line("", "empty.jsonl", [&](nlohmann::json&, const std::string& where) { seen.push_back(where); });
  EXPECT_TRUE(seen.empty());
}

TEST(JsonLines, ABrokenLineIsAnErrorNamingItsPlace) {
  const auto read = [](std::string_view text, std::string_view expected) {
    return test::error_of([&] { io::for_each_json_line(text, "in.jsonl", [](nlohmann::json&, const std::string&) {}, expected); });
  };
  EXPECT_EQ(read("1\n\n{\"id\": 5,\n", ""), "in.jsonl:3: not valid JSON");
  EXPECT_EQ(read("{\"text\": \"cut", "a string or {\"text\": string}"),
            "in.jsonl:1: not valid JSON (expected a string or {\"text\": string})");
  // The callback's own errors go through as they are.
  EXPECT_EQ(test::error_of([] {
              io::for_each_json_line("1\n2", "x", [](nlohmann::json& v, const std::string& where) {
                check(v != 2, where + ": two");
              });
            }),
            "x:2: two");
}

}  // namespace
}  // namespace bioquant
