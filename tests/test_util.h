// Shared helpers for the tests: temporary directories, tiny model directories, running the CLI.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bioquant/model/config.h"

// Peak-RSS comparisons mean nothing under AddressSanitizer: its shadow memory and its quarantine of
// freed blocks are resident too (nf4's peak measured 58% of bf16's there against ~30% in a plain build).
// Tests that compare measured peaks skip in such a build (CMake's BIOQUANT_SANITIZE).
#if defined(__SANITIZE_ADDRESS__)
#define SKIP_WHERE_RSS_IS_SANITIZED() GTEST_SKIP() << "peak RSS under AddressSanitizer counts its shadow memory"
#else
#define SKIP_WHERE_RSS_IS_SANITIZED() static_cast<void>(0)
#endif

namespace bioquant::test {

// A fresh directory under $TMPDIR, removed with everything in it when the object dies.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// The message of the bioquant::Error that f throws, or "(no error)".
std::string error_of(const std::function<void()>& f);

void write_file(const std::string& path, const std::string& content);
std::string read_file(const std::string& path);
void copy_file(const std::string& from, const std::string& to);

// config.json text of a tiny llama (hidden 32, 2 layers, 4/2 heads, ffn 64, vocab 64).
std::string tiny_llama_config_json();
// Writes config.json + model.safetensors of that tiny llama with random f32 weights.
// `skip` leaves one tensor out; `reshape` gives one tensor the shape [3, 3].
void write_tiny_llama(const std::string& dir, const std::string& skip = "", const std::string& reshape = "");

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};
// Runs the built `bioquant` binary with the given arguments (shell-quoted here).
CliResult run_cli(const std::vector<std::string>& args);

// ggml blocks packed as llama.cpp's reference quantizers pack them (quantize_row_q5_0_ref,
// quantize_row_q3_K_ref), from chosen levels: the other direction from the library's readers.
// q5_0: 32 levels 0..31 (value (q - 16) * d), 22 bytes. q3_k: 256 levels 0..7 (value q - 4) and 16
// scales 0..63 (each 16 values' scale d * (s - 32)), 110 bytes.
std::vector<uint8_t> pack_q5_0_block(const uint8_t* levels, uint16_t d);
std::vector<uint8_t> pack_q3_k_block(const uint8_t* levels, const uint8_t* scales, uint16_t d);

std::string fixtures_dir();  // tests/fixtures in the source tree
std::string shared_dir();    // ../shared beside the checkout ("" when absent)

}  // namespace bioquant::test
