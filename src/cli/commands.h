// The `bioquant` subcommands. Each registers its flags on the CLI11 app and returns the
// function that runs it; the functions throw bioquant::Error for user-facing failures.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace bioquant::cli {

using Run = std::function<int()>;

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
