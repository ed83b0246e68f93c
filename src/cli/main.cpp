// bioquant: command-line front end. Thin: parse flags, call the library, print.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <vector>
#include <unistd.h>

#include "bioquant/core/closest_name.h"
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

namespace bioquant::cli {

std::vector<RegisteredCommand>& registered_commands() {
  static std::vector<RegisteredCommand> commands;
  return commands;
}

CommandRegistration::CommandRegistration(int order, const char* name, const char* about, Run (*add)(CLI::App&)) {
  registered_commands().push_back({order, name, about, add});
}

}  // namespace bioquant::cli

int main(int argc, char** argv) {
  CLI::App app{"BioQuant: run quantized LLMs locally and measure what quantization costs on biomedical NLP"};
  app.set_version_flag("--version", std::string(BIOQUANT_VERSION));
  app.require_subcommand(1);
  std::map<CLI::App*, bioquant::cli::Run> commands;
  auto add = [&](const char* name, const char* about, bioquant::cli::Run (*f)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, about);
    commands[sub] = f(*sub);
  };
  using bioquant::cli::RegisteredCommand;
  std::vector<RegisteredCommand> all = {
      {10, "info", "Architecture, sizes, dtype and memory of a model", bioquant::cli::add_info},
      {20, "tokenize", "Text to token ids with the model's own tokenizer", bioquant::cli::add_tokenize},
      {30, "logits", "Print the logits of a token sequence as JSON", bioquant::cli::add_logits},
      {40, "generate", "Generate tokens from a prompt (greedy by default)", bioquant::cli::add_generate},
      {50, "quantize", "Quantize a model and write it as a GGUF file", bioquant::cli::add_quantize},
      {60, "kld", "KL divergence, same-top-token rate and perplexity of a model against a base", bioquant::cli::add_kld},
      {70, "tasks", "List the benchmark tasks (built in and from --task-file)", bioquant::cli::add_tasks},
      {80, "eval", "Evaluate a model on the BioNLP benchmarks (resumable)", bioquant::cli::add_eval},
      {90, "score", "Score raw outputs produced elsewhere, exactly as eval does", bioquant::cli::add_score},
      {95, "compare-runs", "Paired comparison of two eval runs: score difference, CI, flips",
       bioquant::cli::add_compare_runs},
      {100, "bench", "Prompt-processing and generation speed, llama-bench style", bioquant::cli::add_bench},
  };
  for (const auto& r : bioquant::cli::registered_commands()) all.push_back(r);
  std::stable_sort(all.begin(), all.end(), [](const auto& a, const auto& b) { return a.order < b.order; });
  for (const auto& r : all) add(r.name, r.about, r.add);
  // CLI11 would say "A subcommand is required" to a missing or mistyped command: name the commands there are.
  if (argc == 1 || argv[1][0] != '-') {
    std::string known;
    for (const auto& r : all) known += (known.empty() ? "" : ", ") + std::string(r.name);
    if (argc == 1) {
      std::fprintf(stderr, "error: give a command (commands: %s; bioquant COMMAND --help)\n", known.c_str());
      return 2;
    }
    if (std::none_of(all.begin(), all.end(), [&](const auto& r) { return r.name == std::string(argv[1]); })) {
      std::vector<std::string> names;
      for (const auto& r : all) names.emplace_back(r.name);
      const std::string near = bioquant::closest_name(argv[1], names);
      std::fprintf(stderr, "error: unknown command '%s'%s (commands: %s)\n", one_line(argv[1]).c_str(),
                   near.empty() ? "" : (" (did you mean " + near + "?)").c_str(), known.c_str());
      return 2;
    }
    // A mistyped option: CLI11 would first report a required option as missing ("--modle x" said
    // "--model is required"). Name the unknown one, and the option it probably was.
    CLI::App* sub = app.get_subcommand(argv[1]);
    std::vector<std::string> options;
    for (const CLI::Option* o : sub->get_options())
      for (const std::string& n : o->get_lnames()) options.push_back("--" + n);
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg == "--") break;
      if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) continue;
      const std::string name = arg.substr(0, arg.find('='));
      if (std::find(options.begin(), options.end(), name) != options.end()) continue;
      const std::string near = bioquant::closest_name(name, options);
      std::fprintf(stderr, "error: unknown option '%s' for bioquant %s%s (bioquant %s --help)\n",
                   one_line(name).c_str(), argv[1], near.empty() ? "" : (": did you mean " + near + "?").c_str(),
                   argv[1]);
      return 2;
    }
  }
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
    // Say how much there was and where to find what a run needs (a 70B model at bf16 on a small machine).
    const double ram_gib = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE)) /
                           (1024.0 * 1024.0 * 1024.0);
    std::fprintf(stderr,
                 "error: out of memory (this machine has %.1f GiB of RAM; 'bioquant estimate' predicts a run's peak by "
                 "precision)\n",
                 ram_gib);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: internal: %s\n", one_line(e.what()).c_str());
  }
  return 1;
}
