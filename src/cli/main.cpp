// bioquant: command-line front end. Thin: parse flags, call the library, print.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "bioquant/core/error.h"
#include "cli/commands.h"

namespace {

// One line, whatever the message held.
std::string one_line(std::string s) {
  for (char& ch : s) {
    if (ch == '\n' || ch == '\r') ch = ' ';
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"BioQuant: run quantized LLMs locally and measure what quantization costs on biomedical NLP"};
  app.set_version_flag("--version", std::string(BIOQUANT_VERSION));
  app.require_subcommand(1);
  std::map<CLI::App*, bioquant::cli::Run> commands;
  auto add = [&](const char* name, const char* about, bioquant::cli::Run (*f)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, about);
    commands[sub] = f(*sub);
  };
  add("info", "Architecture, sizes, dtype and memory of a model", bioquant::cli::add_info);
  add("tokenize", "Text to token ids with the model's own tokenizer", bioquant::cli::add_tokenize);
  add("logits", "Print the logits of a token sequence as JSON", bioquant::cli::add_logits);
  add("generate", "Generate tokens from a prompt (greedy by default)", bioquant::cli::add_generate);
  add("quantize", "Quantize a model and write it as a GGUF file", bioquant::cli::add_quantize);
  add("kld", "KL divergence, same-top-token rate and perplexity of a model against a base", bioquant::cli::add_kld);
  add("tasks", "List the benchmark tasks (built in and from --task-file)", bioquant::cli::add_tasks);
  add("eval", "Evaluate a model on the BioNLP benchmarks (resumable)", bioquant::cli::add_eval);
  add("score", "Score raw outputs produced elsewhere, exactly as eval does", bioquant::cli::add_score);
  add("compare-runs", "Paired comparison of two eval runs: score difference, CI, flips", bioquant::cli::add_compare_runs);
  add("bench", "Prompt-processing and generation speed, llama-bench style", bioquant::cli::add_bench);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "error: %s (see 'bioquant --help')\n", one_line(e.what()).c_str());
    return 2;
  }
  try {
    for (const auto& [sub, run] : commands) {
      if (sub->parsed()) return run();
    }
    return 2;
  } catch (const bioquant::Error& e) {
    std::fprintf(stderr, "error: %s\n", one_line(e.what()).c_str());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: internal: %s\n", one_line(e.what()).c_str());
  }
  return 1;
}
