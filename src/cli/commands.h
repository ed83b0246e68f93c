// The `bioquant` subcommands. Each registers its flags on the CLI11 app and returns the
// function that runs it; the functions throw bioquant::Error for user-facing failures.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <vector>

namespace bioquant::cli {

using Run = std::function<int()>;

// Subcommands defined in their own source files register themselves with one static object, so
// adding a command touches no central list: `static const CommandRegistration reg(60, "serve",
// "about", add_serve);`. `order` places it in --help (the built-ins use 10..100 in steps of 10).
struct CommandRegistration {
  CommandRegistration(int order, const char* name, const char* about, Run (*add)(CLI::App&));
};
struct RegisteredCommand {
  int order;
  const char* name;
  const char* about;
  Run (*add)(CLI::App&);
};
std::vector<RegisteredCommand>& registered_commands();

Run add_info(CLI::App& app);
Run add_tokenize(CLI::App& app);
Run add_logits(CLI::App& app);
Run add_generate(CLI::App& app);
Run add_bench(CLI::App& app);
Run add_quantize(CLI::App& app);
Run add_kld(CLI::App& app);
Run add_eval(CLI::App& app);
Run add_score(CLI::App& app);
Run add_compare_runs(CLI::App& app);
Run add_tasks(CLI::App& app);

}  // namespace bioquant::cli
