#include "cli/commands.h"
#include "cli/common.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/core/memory.h"
#include "bioquant/core/progress.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/engine/fidelity.h"
#include "bioquant/engine/generator.h"
#include "bioquant/io/gguf.h"
#include "bioquant/io/gguf_export.h"
#include "bioquant/io/json_lines.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/quantize.h"
#include "bioquant/model/synthetic.h"
#include "bioquant/tokenizer/chat_template.h"
#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant::cli {

using nlohmann::json;

namespace {
// A validator that parses the option's text as a number and checks it with `ok`.
CLI::Validator number_check(bool (*ok)(double), const char* expected, const char* name) {
  return CLI::Validator(
      [ok, expected](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        if (text.empty() || end != text.c_str() + text.size() || !std::isfinite(v) || !ok(v))
          return std::string("expected ") + expected + ", got '" + text + "'";
        return {};
      },
      name);
}
}  // namespace

CLI::Validator positive_number() {
  return number_check([](double v) { return v > 0; }, "a number above 0", "POSITIVE");
}
CLI::Validator non_negative_number() {
  return number_check([](double v) { return v >= 0; }, "a number of 0 or more", "NONNEGATIVE");
}

constexpr const char* kExactHelp =
    "exact numerics: the same logits, bit for bit, on the CPU and on any GPU (one summation order, no fused "
    "multiply-add; slower; the GPU's KV cache in f32)";

void add_model_flags(CLI::App& app, Common& c, bool required) {
  auto* opt = app.add_option("--model", c.model, "Hugging Face model directory or GGUF file");
  if (required) opt->required();
  app.add_option("--threads", c.threads, "CPU threads (default: all cores)")->check(non_negative_number());
  // (No driver call here: every command's options are built at start-up, and a process that touched
  // CUDA cannot use it in the workers it forks: sweep's.)
  app.add_option("--device", c.device, "cpu (default), cuda or cuda:N (a build with the CUDA backend and a GPU)");
  app.add_option("--kv-cache", c.kv_cache, "GPU KV cache: bf16 (default), f32, or q8 (int8 + fp16 scale per 32 values)");
  app.add_option("--gpu-memory", c.gpu_memory_gib,
                 "GiB of GPU memory the run may use, CUDA context included (default: the card's): allocations past it "
                 "fail, long prompts go in rounds that fit; to try a smaller card's fit on a larger one")
      ->check(positive_number());
  app.add_option("--quant", c.quant, "quantize on load: " + quant_names_list());
  app.add_flag("--double-quant", c.double_quant, "nf4/fp4: quantize the block scales too (~4.13 bits/weight)");
  app.add_option("--quant-policy", c.quant_policy,
                 "default (bitsandbytes: linear layers only; GGUF types: + embedding, output q6_k), all, linear");
  app.add_option("--int8-threshold", c.int8_threshold,
                 "int8: LLM.int8 outlier threshold, features at or above it run in f32 (0 = off; bitsandbytes: 6)")
      ->check(non_negative_number());
  app.add_flag("--exact", c.exact, kExactHelp);
}

std::optional<QuantRecipe> recipe_of(const Common& c) {
  if (c.quant.empty()) {
    check(!c.double_quant, "--double-quant needs --quant nf4 or fp4");
    return std::nullopt;
  }
  QuantRecipe r = parse_quant_recipe(c.quant, c.double_quant, c.quant_policy);
  check(c.int8_threshold == 0.0f || r.base == QuantType::INT8, "--int8-threshold applies to --quant int8 only");
  r.int8_threshold = c.int8_threshold;
  return r;
}

void report_fallbacks(const std::vector<TensorPlan>& plan) {
  for (const TensorPlan& p : plan)
    if (!p.note.empty()) std::fprintf(stderr, "note: %s: %s\n", p.name.c_str(), p.note.c_str());
  const std::string requantized = requantization_note(plan);
  if (!requantized.empty()) std::fprintf(stderr, "warning: %s\n", requantized.c_str());
}

void quantize_showing_progress(Model& model, const std::vector<TensorPlan>& plan, const std::string& format,
                               ThreadPool& pool) {
  // A large model takes a minute or more on a few cores; a small one would only add lines to logs.
  constexpr int64_t kShowFrom = 200'000'000;  // weights to quantize
  std::optional<ProgressLine> line;
  quantize_model(model, plan, pool, [&](int64_t done, int64_t total) {
    const auto millions = [](int64_t weights) { return static_cast<size_t>(weights / 1'000'000); };
    if (!line) line.emplace(total >= kShowFrom, "quantize " + format, "M weights", "M/s", millions(total));
    else line->update(millions(done), "", done == total);
  });
}

// Loads a model and quantizes it on load when --quant is given.
std::unique_ptr<Model> load_model(const std::string& path) {
  auto model = Model::load(path);
  for (const std::string& note : model->load_notes()) std::fprintf(stderr, "note: %s\n", note.c_str());
  return model;
}

std::unique_ptr<Model> open_model(const Common& c, ThreadPool& pool) {
  auto model = load_model(c.model);
  if (const auto recipe = recipe_of(c)) {
    const auto plan = plan_quantization(*model, *recipe);
    report_fallbacks(plan);
    quantize_showing_progress(*model, plan, recipe->name, pool);
  }
  return model;
}

void report_peak_memory() {
  std::fprintf(stderr, "peak memory (RSS): %.1f MiB\n", static_cast<double>(peak_rss_bytes()) / (1024.0 * 1024.0));
}

int check_device(const Common& c) {
  const int device = parse_device(c.device);
  check(device >= 0 || c.gpu_memory_gib == 0.0, "--gpu-memory applies to --device cuda");
  check(device >= 0 || c.kv_cache.empty(), "--kv-cache applies to --device cuda (the CPU engine keeps its cache in f32)");
  if (!c.kv_cache.empty()) parse_kv_type(c.kv_cache);  // a bad name fails here, before the model loads
  check(!c.exact || c.kv_cache.empty() || c.kv_cache == "f32", "--exact keeps the KV cache in f32: drop --kv-cache " + c.kv_cache);
  check(!c.exact || c.int8_threshold == 0.0f, "--exact has no LLM.int8 outlier decomposition: drop --int8-threshold");
  return device;
}

KvType apply_gpu_flags(const Common& c, int device) {
  if (device >= 0) set_cuda_memory_limit(static_cast<size_t>(c.gpu_memory_gib * 1024.0 * 1024.0 * 1024.0));
  if (c.exact) return KvType::F32;
  return c.kv_cache.empty() ? KvType::BF16 : parse_kv_type(c.kv_cache);
}

void report_gpu_memory(const Decoder& decoder) {
  if (!decoder.gpu()) return;
  const GpuMemory m = decoder.gpu()->memory();
  const auto mib = [](size_t b) { return static_cast<double>(b) / (1024.0 * 1024.0); };
  std::fprintf(stderr, "GPU memory: weights %.1f MiB, KV cache %.1f MiB, workspace %.1f MiB; peak allocated %.1f MiB; "
               "device peak used %.1f MiB of %.1f MiB (cudaMemGetInfo; %.1f MiB of it before any allocation: the CUDA "
               "context and cuBLAS)\n",
               mib(m.weights), mib(m.kv_cache), mib(m.workspace), mib(m.peak_allocated), mib(m.device_used_peak),
               mib(m.device_total), mib(m.device_used_at_start));
  if (cuda_memory_limit() > 0)
    std::fprintf(stderr, "GPU memory limit: %.1f MiB (--gpu-memory); the device peak above is %s it\n",
                 mib(cuda_memory_limit()), m.device_used_peak <= cuda_memory_limit() ? "within" : "OVER");
  std::fprintf(stderr, "GPU prompt matmuls: %s\n", decoder.gpu()->prompt_matmuls().c_str());
}

namespace {

std::vector<int32_t> parse_token_list(const std::string& text) {
  std::vector<int32_t> ids;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    check(!item.empty(), "--tokens: empty entry in '" + text + "' (expected ids like 1,2,3)");
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    check(used == item.size(), "--tokens: '" + item + "' is not an integer token id");
    check(v >= 0 && v <= INT32_MAX, "--tokens: token id " + item + " out of range");
    ids.push_back(static_cast<int32_t>(v));
  }
  check(!ids.empty(), "--tokens: no token ids given");
  return ids;
}

// JSON lines, each a string or {"text": string}; blank lines are skipped.
std::vector<std::string> read_json_lines_texts(const std::string& path) {
  std::vector<std::string> texts;
  io::for_each_json_line(
      read_text_file(path), path,
      [&](json& j, const std::string& where) {
        if (j.is_object() && j.contains("text")) j = j["text"];
        check(j.is_string(), where + ": not a string or {\"text\": string}");
        texts.push_back(j.get<std::string>());
      },
      "a string or {\"text\": string}");
  return texts;
}

const char* rope_type_name(RopeType t) {
  switch (t) {
    case RopeType::Default: return "default";
    case RopeType::Linear: return "linear";
    case RopeType::Llama3: return "llama3";
    case RopeType::LongRope: return "longrope";
    case RopeType::Yarn: return "yarn";
  }
  return "?";
}

json rope_json(const ModelConfig& c) {
  json r = {{"theta", c.rope.theta}, {"type", rope_type_name(c.rope.type)}, {"factor", c.rope.factor},
            {"rotary_dim", c.rotary_dim()}};
  if (c.rope.type == RopeType::LongRope || c.rope.type == RopeType::Yarn) {
    r["original_max_position_embeddings"] = c.rope.original_max_positions;
    r["attention_factor"] = c.rope.attention_factor;
  }
  return r;
}

json config_json(const ModelConfig& c) {
  json layer_types = json::array();
  for (bool s : c.layer_sliding) layer_types.push_back(s ? "sliding" : "full");
  return {{"model_type", c.model_type},
          {"hidden_size", c.hidden},
          {"intermediate_size", c.intermediate},
          {"num_layers", c.n_layers},
          {"num_heads", c.n_heads},
          {"num_kv_heads", c.n_kv_heads},
          {"head_dim", c.head_dim},
          {"vocab_size", c.vocab},
          {"max_position_embeddings", c.max_positions},
          {"rms_norm_eps", c.norm_eps},
          {"tie_word_embeddings", c.tie_embeddings},
          {"rope", rope_json(c)},
          {"sliding_window", c.sliding_window},
          {"layer_types", layer_types},
          {"attn_logit_softcapping", c.attn_softcap},
          {"final_logit_softcapping", c.final_softcap},
          {"attention_scale", c.attention_scale()},
          {"bos_token_ids", c.bos_ids},
          {"eos_token_ids", c.eos_ids},
          {"parameters", c.parameter_count()}};
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

Run add_info(CLI::App& app) {
  auto opts = std::make_shared<Common>();
  auto as_json = std::make_shared<bool>(false);
  auto ctx = std::make_shared<int64_t>(4096);
  add_model_flags(app, *opts);
  app.add_option("--ctx", *ctx, "context length for the KV-cache estimate")->check(positive_number());
  app.add_flag("--json", *as_json, "print one JSON object");
  auto batch = std::make_shared<int64_t>(512);
  app.add_option("--batch", *batch, "tokens per forward pass for the activation estimate (default 512)")
      ->check(positive_number());
  return [=]() {
    auto model = load_model(opts->model);
    const ModelConfig& c = model->config();
    const double params = static_cast<double>(c.parameter_count());
    const double kv_per_token = 2.0 * static_cast<double>(c.n_layers * c.kv_dim()) * sizeof(float);
    // Weights as they would be held: the plan of --quant (nothing is quantized here), else as stored.
    std::vector<TensorPlan> plan;
    if (const auto recipe = recipe_of(*opts)) {
      plan = plan_quantization(*model, *recipe);
    } else {
      for (const auto& [name, m] : model->named_matrices())
        plan.push_back({name, m->rows, m->cols, m->type, m->type, m->double_quant, m->outlier_threshold, ""});
    }
    std::map<std::string, std::pair<double, double>> by_format;  // name -> (bytes, parameters)
    double matrix_bytes = 0, matrix_params = 0;
    for (const TensorPlan& p : plan) {
      const std::string f = std::string(quant_traits(p.to).name) + (p.double_quant ? "+dq" : "");
      by_format[f].first += static_cast<double>(p.bytes());
      by_format[f].second += static_cast<double>(p.rows * p.cols);
      matrix_bytes += static_cast<double>(p.bytes());
      matrix_params += static_cast<double>(p.rows * p.cols);
    }
    const double small_bytes = static_cast<double>(model->weight_bytes());
    double stored_matrix_bytes = 0;
    for (const auto& [name, m] : model->named_matrices()) stored_matrix_bytes += static_cast<double>(m->nbytes());
    const double vector_bytes = small_bytes - stored_matrix_bytes;  // norms and biases, f32
    const double n = static_cast<double>(*batch);
    const double activation_bytes =
        4.0 * (n * (2.0 * c.hidden + 2.0 * c.q_dim() + 2.0 * c.kv_dim() + 2.0 * c.intermediate + c.rotary_dim()) +
               c.vocab + static_cast<double>(*ctx) * ThreadPool::hardware_threads());
    json formats = json::object();
    for (const auto& [f, bp] : by_format)
      formats[f] = {{"bytes", bp.first}, {"parameters", bp.second}, {"bits_per_weight", 8.0 * bp.first / bp.second}};
    json fallbacks = json::array();
    for (const TensorPlan& p : plan)
      if (!p.note.empty()) fallbacks.push_back({{"tensor", p.name}, {"note", p.note}});
    json out = config_json(c);
    out["path"] = opts->model;
    out["weight_dtype"] = model->weight_dtype();
    out["quant"] = opts->quant.empty() ? json(nullptr) : json(opts->quant);
    out["memory_bytes"] = {{"weights", matrix_bytes + vector_bytes}, {"weights_by_format", formats},
                           {"norms_and_biases_f32", vector_bytes}, {"kv_cache_at_ctx", kv_per_token * (*ctx)},
                           {"kv_cache_per_token", kv_per_token}, {"ctx", *ctx}, {"activations", activation_bytes},
                           {"batch", *batch},
                           {"total_estimate", matrix_bytes + vector_bytes + kv_per_token * (*ctx) + activation_bytes}};
    out["fallbacks"] = fallbacks;
    std::string tokenizer = "none";
    try {
      tokenizer = load_tokenizer(opts->model)->kind();
    } catch (const Error&) {
    }
    out["tokenizer"] = tokenizer;
    if (*as_json) {
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    std::printf("model        %s\n", opts->model.c_str());
    std::printf("architecture %s, %lld layers, hidden %lld, ffn %lld, heads %lld/%lld (head_dim %lld), vocab %lld\n",
                c.model_type.c_str(), (long long)c.n_layers, (long long)c.hidden, (long long)c.intermediate,
                (long long)c.n_heads, (long long)c.n_kv_heads, (long long)c.head_dim, (long long)c.vocab);
    std::printf("parameters   %.0f (%.3f B)\n", params, params / 1e9);
    std::printf("tokenizer    %s\n", tokenizer.c_str());
    std::printf("rope         %s, theta %g, rotary dim %lld", rope_type_name(c.rope.type), c.rope.theta,
                (long long)c.rotary_dim());
    if (c.rope.type == RopeType::LongRope)
      std::printf(" (long factors past %lld positions, attention factor %.4f)", (long long)c.rope.original_max_positions,
                  c.rope.attention_factor);
    if (c.rope.type == RopeType::Yarn)
      std::printf(" (factor %g over %lld positions, attention factor %.4f)", c.rope.factor,
                  (long long)c.rope.original_max_positions, c.rope.attention_factor);
    std::printf("\n");
    if (c.sliding_window > 0) std::printf("sliding      window %lld\n", (long long)c.sliding_window);
    std::printf("memory%s (estimate; runs report their measured peak):\n",
                opts->quant.empty() ? "" : (" at --quant " + opts->quant).c_str());
    for (const auto& [f, bp] : by_format)
      std::printf("  weights %-8s %s  (%.0f parameters, %.3f bits/weight)\n", f.c_str(), gib(bp.first).c_str(), bp.second,
                  8.0 * bp.first / bp.second);
    std::printf("  norms/biases     %s\n", gib(vector_bytes).c_str());
    std::printf("  KV cache (f32)   %s at %lld tokens\n", gib(kv_per_token * (*ctx)).c_str(), (long long)*ctx);
    std::printf("  activations      %s for %lld-token passes\n", gib(activation_bytes).c_str(), (long long)*batch);
    std::printf("  total            %s (+ the program itself, ~10 MiB)\n",
                gib(matrix_bytes + vector_bytes + kv_per_token * (*ctx) + activation_bytes).c_str());
    for (const TensorPlan& p : plan)
      if (!p.note.empty()) std::printf("fallback     %s: %s\n", p.name.c_str(), p.note.c_str());
    return 0;
  };
}

Run add_tokenize(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto file = std::make_shared<std::string>();
  auto no_special = std::make_shared<bool>(false);
  auto as_json = std::make_shared<bool>(false);
  auto bench = std::make_shared<bool>(false);
  app.add_option("--model", *path, "model directory, .gguf file, tokenizer.json or tokenizer.model")->required();
  auto* t = app.add_option("--text", *text, "text to tokenize");
  auto* f = app.add_option("--file", *file, "JSON lines, each a string or {\"text\": ...}: prints {\"ids\": [...]} per line");
  t->excludes(f);
  app.add_flag("--no-special", *no_special, "add no BOS/EOS and treat special-token text as plain text");
  app.add_flag("--json", *as_json, "print {\"ids\": [...]}");
  app.add_flag("--bench", *bench, "with --file: time single-thread encoding of all lines (best of 5) instead of printing ids");
  return [=]() {
    check(t->count() > 0 || !file->empty(), "give --text TEXT or --file FILE");
    auto tok = load_tokenizer(*path);
    if (!file->empty()) {
      const std::vector<std::string> texts = read_json_lines_texts(*file);
      if (*bench) {
        size_t bytes = 0, n_tokens = 0;
        for (const auto& s : texts) bytes += s.size();
        double best = 1e30;
        for (int rep = 0; rep < 5; ++rep) {
          n_tokens = 0;
          const auto t0 = std::chrono::steady_clock::now();
          for (const auto& s : texts) n_tokens += tok->encode(s, !*no_special).size();
          best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        }
        json out = {{"texts", texts.size()}, {"bytes", bytes}, {"tokens", n_tokens}, {"seconds", best},
                    {"mb_per_s", static_cast<double>(bytes) / best / 1e6}, {"tokens_per_s", static_cast<double>(n_tokens) / best},
                    {"threads", 1}, {"tokenizer", tok->kind()}};
        std::printf("%s\n", out.dump().c_str());
        return 0;
      }
      for (const auto& s : texts) std::printf("%s\n", json{{"ids", tok->encode(s, !*no_special)}}.dump().c_str());
      return 0;
    }
    const std::vector<int32_t> ids = tok->encode(*text, !*no_special);
    if (*as_json) {
      std::printf("%s\n", json{{"ids", ids}}.dump().c_str());
      return 0;
    }
    for (int32_t id : ids) std::printf("%6d  %s\n", id, json(tok->token_text(id)).dump().c_str());
    std::printf("%zu tokens (%s)\n", ids.size(), tok->kind().c_str());
    return 0;
  };
}

Run add_logits(CLI::App& app) {
  auto opts = std::make_shared<Common>();
  auto tokens = std::make_shared<std::string>();
  auto last = std::make_shared<int64_t>(1);
  add_model_flags(app, *opts);
  app.add_option("--tokens", *tokens, "comma-separated token ids, e.g. 1,2,3")->required();
  app.add_option("--last", *last, "print logits of the last K positions (default 1)")->check(non_negative_number());
  return [=]() {
    const int device = check_device(*opts);
    const std::vector<int32_t> ids = parse_token_list(*tokens);
    ThreadPool pool(opts->threads);
    auto model = open_model(*opts, pool);
    const ModelConfig& c = model->config();
    check(*last <= static_cast<int64_t>(ids.size()),
          "--last " + std::to_string(*last) + " exceeds the " + std::to_string(ids.size()) + " positions given");
    Decoder decoder(*model, pool, device, apply_gpu_flags(*opts, device), opts->exact);
    KVCache cache(c, static_cast<int64_t>(ids.size()));
    const int64_t n = static_cast<int64_t>(ids.size());
    std::vector<float> logits(static_cast<size_t>(n * c.vocab));
    decoder.forward(ids.data(), n, cache, n, logits.data());
    json out;
    out["n_vocab"] = c.vocab;
    json argmax_list = json::array();
    for (int64_t t = 0; t < n; ++t) argmax_list.push_back(top_token(logits.data() + t * c.vocab, c.vocab));
    out["argmax"] = argmax_list;
    json rows = json::array();
    for (int64_t t = n - *last; t < n; ++t) {
      rows.push_back(std::vector<float>(logits.begin() + t * c.vocab, logits.begin() + (t + 1) * c.vocab));
    }
    out["logits"] = rows;
    std::printf("%s\n", out.dump().c_str());
    report_peak_memory();
    report_gpu_memory(decoder);
    return 0;
  };
}

Run add_generate(CLI::App& app) {
  auto opts = std::make_shared<Common>();
  auto prompt = std::make_shared<std::string>();
  auto tokens = std::make_shared<std::string>();
  auto gen = std::make_shared<GenerateOptions>();
  auto as_json = std::make_shared<bool>(false);
  auto chat = std::make_shared<bool>(false);
  auto ignore_eos = std::make_shared<bool>(false);
  add_model_flags(app, *opts);
  auto* p = app.add_option("--prompt", *prompt, "prompt text (needs the model's tokenizer)");
  auto* t = app.add_option("--tokens", *tokens, "prompt as comma-separated token ids");
  p->excludes(t);
  app.add_flag("--chat", *chat, "wrap the prompt in the model's chat template");
  app.add_option("--max-new-tokens", gen->max_new_tokens, "tokens to generate (default 64)")
      ->check(non_negative_number());
  app.add_option("--temperature", gen->sampling.temperature, "0 = greedy (default)")->check(non_negative_number());
  app.add_option("--top-k", gen->sampling.top_k, "sample among the k most likely (0 = off)")
      ->check(non_negative_number());
  app.add_option("--top-p", gen->sampling.top_p, "nucleus sampling mass (1 = off)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--seed", gen->sampling.seed, "sampling seed (default 0)");
  app.add_flag("--ignore-eos", *ignore_eos, "keep generating past EOS tokens");
  app.add_flag("--json", *as_json, "print {\"tokens\": [...], \"text\": \"...\"}");
  auto show_prompt = std::make_shared<bool>(false);
  app.add_flag("--show-prompt", *show_prompt, "print the rendered prompt (after the chat template) to stderr");
  return [=]() {
    const int device = check_device(*opts);
    check(!prompt->empty() || !tokens->empty(), "give --prompt TEXT or --tokens IDS");
    check(!*chat || !prompt->empty(), "--chat needs --prompt TEXT");
    ThreadPool pool(opts->threads);
    auto model = open_model(*opts, pool);
    // The tokenizer is needed for text in or out; a model directory without one still runs on ids.
    std::unique_ptr<Tokenizer> tok;
    if (!prompt->empty()) {
      tok = load_tokenizer(opts->model);
    } else {
      try {
        tok = load_tokenizer(opts->model);
      } catch (const Error&) {
      }
    }
    std::vector<int32_t> ids;
    if (!prompt->empty()) {
      if (*chat) {
        check(!tok->chat_template().empty(), opts->model + ": the tokenizer ships no chat template; drop --chat");
        const ChatTemplate tmpl(tok->chat_template());
        const std::string rendered = tmpl.render({{"user", *prompt}}, true, tok->bos_token(), tok->eos_token());
        if (*show_prompt) std::fprintf(stderr, "%s\n", rendered.c_str());
        // As transformers does: the template writes BOS itself, so nothing is added, but the
        // special-token text it wrote is recognised.
        ids = tok->encode(rendered, /*add_special=*/false, /*parse_special=*/true);
      } else {
        ids = tok->encode(*prompt, true);
      }
    } else {
      ids = parse_token_list(*tokens);
    }
    check(!ids.empty(), "the prompt encodes to no tokens");
    // As eval does: past the trained context the positions are valid for the cache but the answers unreliable.
    const int64_t trained = model->config().max_positions,
                  positions = static_cast<int64_t>(ids.size()) + static_cast<int64_t>(gen->max_new_tokens);
    if (trained > 0 && positions > trained)
      std::fprintf(stderr, "warning: the prompt (%zu tokens) and --max-new-tokens %lld need %lld positions, more than the "
                   "model's %lld; tokens past that point are unreliable\n", ids.size(),
                   static_cast<long long>(gen->max_new_tokens), static_cast<long long>(positions),
                   static_cast<long long>(trained));
    Decoder decoder(*model, pool, device, apply_gpu_flags(*opts, device), opts->exact);
    GenerateOptions options = *gen;
    options.stop_at_eos = !*ignore_eos;
    std::unique_ptr<StreamDecoder> stream;
    const bool stream_text = tok && !*as_json;
    if (stream_text) stream = std::make_unique<StreamDecoder>(*tok, true);
    const GenerateResult r = generate(decoder, ids, options, [&](int32_t id) {
      if (stream) {
        std::fputs(stream->push(id).c_str(), stdout);
        std::fflush(stdout);
      }
    });
    const double tg = r.decode_seconds > 0 ? static_cast<double>(r.tokens.size() > 0 ? r.tokens.size() - 1 : 0) / r.decode_seconds : 0;
    if (stream) {
      std::printf("%s\n", stream->finish().c_str());
      std::fflush(stdout);  // the statistics below go to stderr: keep the text before them
    }
    std::fprintf(stderr, "prompt %zu tokens in %.3f s (%.1f tok/s), generated %zu tokens (%.1f tok/s), stop: %s\n",
                 ids.size(), r.prompt_seconds, static_cast<double>(ids.size()) / std::max(r.prompt_seconds, 1e-9),
                 r.tokens.size(), tg, r.stop_reason.c_str());
    report_peak_memory();
    report_gpu_memory(decoder);
    if (*as_json) {
      // Without a tokenizer there is no text to give: an empty string, never invented text.
      json out = {{"tokens", r.tokens}, {"text", tok ? tok->decode(r.tokens, true) : ""}, {"stop_reason", r.stop_reason}};
      std::printf("%s\n", out.dump().c_str());
    } else if (!stream) {
      std::string line;
      for (int32_t id : r.tokens) line += (line.empty() ? "" : " ") + std::to_string(id);
      std::printf("%s\n", line.c_str());
    }
    return 0;
  };
}

Run add_quantize(CLI::App& app) {
  auto opts = std::make_shared<Common>();
  auto out_path = std::make_shared<std::string>();
  auto type = std::make_shared<std::string>();
  auto name = std::make_shared<std::string>();
  app.add_option("--model", opts->model, "Hugging Face model directory or GGUF file")->required();
  app.add_option("--type", *type, "format: " + quant_names_list())->required();
  app.add_option("--out", *out_path, "output .gguf file (written to a temporary file, then renamed)")->required();
  app.add_flag("--double-quant", opts->double_quant, "nf4/fp4: quantize the block scales too");
  app.add_option("--quant-policy", opts->quant_policy, "default, all or linear (see bioquant info --help)");
  app.add_option("--name", *name, "general.name to record (default: the model path)");
  app.add_option("--threads", opts->threads, "CPU threads (default: all cores)")->check(non_negative_number());
  return [=]() {
    check(out_path->size() > 5 && out_path->compare(out_path->size() - 5, 5, ".gguf") == 0, "--out must name a .gguf file");
    Common c = *opts;
    c.quant = *type;
    ThreadPool pool(c.threads);
    auto model = load_model(c.model);
    const auto recipe = *recipe_of(c);
    const auto plan = plan_quantization(*model, recipe);
    report_fallbacks(plan);
    quantize_showing_progress(*model, plan, recipe.name, pool);
    std::unique_ptr<Tokenizer> tok;
    try {
      tok = load_tokenizer(c.model);
    } catch (const Error& e) {
      std::fprintf(stderr, "note: no tokenizer embedded (%s)\n", e.what());
    }
    if (tok && tok->gguf_metadata().empty())
      std::fprintf(stderr, "note: the %s tokenizer has no GGUF description; none embedded\n", tok->kind().c_str());
    write_model_gguf(*model, *out_path, name->empty() ? c.model : *name, tok.get());
    std::fprintf(stderr, "wrote %s: %s, %.3f GiB of weights\n", out_path->c_str(), model->weight_dtype().c_str(),
                 static_cast<double>(model->weight_bytes()) / (1024.0 * 1024.0 * 1024.0));
    report_peak_memory();
    return 0;
  };
}

Run add_kld(CLI::App& app) {
  auto base = std::make_shared<Common>();
  auto other = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto chunk = std::make_shared<int64_t>(512);
  auto max_tokens = std::make_shared<int64_t>(8192);
  auto as_json = std::make_shared<bool>(false);
  app.add_option("--base", base->model, "the reference model (directory or GGUF)")->required();
  auto* m = app.add_option("--model", *other, "the model to compare (default: the base, quantized with --quant)");
  auto* q = app.add_option("--quant", base->quant, "quantize the compared model on load: " + quant_names_list());
  app.add_flag("--double-quant", base->double_quant, "nf4/fp4: quantize the block scales too");
  app.add_option("--quant-policy", base->quant_policy, "default, all or linear");
  app.add_option("--text", *text, "text file (plain text, or JSON lines of strings / {\"text\"})")->required();
  app.add_option("--ctx", *chunk, "tokens per chunk (default 512; each starts with BOS)")->check(CLI::Range(2, 1 << 20));
  app.add_option("--max-tokens", *max_tokens, "compare at most this many tokens (default 8192)")->check(positive_number());
  app.add_option("--threads", base->threads, "CPU threads (default: all cores)")->check(non_negative_number());
  app.add_option("--device", base->device, "cpu (default), cuda or cuda:N: both models run there");
  app.add_option("--kv-cache", base->kv_cache, "with --device cuda: the GPU KV cache, bf16 (default), f32 or q8");
  app.add_flag("--exact", base->exact, kExactHelp);
  app.add_flag("--json", *as_json, "print one JSON object");
  (void)m;
  (void)q;
  return [=]() {
    check(!other->empty() || !base->quant.empty(), "give --model PATH2 or --quant Q");
    const int device = check_device(*base);  // before any model loads
    ThreadPool pool(base->threads);
    Common plain = *base;
    plain.quant.clear();
    plain.double_quant = false;
    auto reference = open_model(plain, pool);
    Common compared = *base;
    if (!other->empty()) compared.model = *other;
    auto model = open_model(compared, pool);
    auto tok = load_tokenizer(base->model);
    // Plain text, or JSON lines of documents joined by blank lines.
    std::string content = read_text_file(*text);
    if (!content.empty() && (content[0] == '"' || content[0] == '{')) {
      std::string joined;
      for (const std::string& doc : read_json_lines_texts(*text)) joined += (joined.empty() ? "" : "\n\n") + doc;
      content = joined;
    }
    std::vector<int32_t> ids = tok->encode(content, false);
    if (static_cast<int64_t>(ids.size()) > *max_tokens) ids.resize(static_cast<size_t>(*max_tokens));
    const KvType kv = apply_gpu_flags(*base, device);
    Decoder d_ref(*reference, pool, device, kv, base->exact), d_model(*model, pool, device, kv, base->exact);
    const auto t0 = std::chrono::steady_clock::now();
    ProgressLine progress(true, "kld", "tokens", "tok/s", ids.size());
    const FidelityStats s = compare_models(d_ref, d_model, ids, *chunk, tok->bos_id() ? *tok->bos_id() : -1,
                                           [&](int64_t done, int64_t total) {
                                             progress.update(static_cast<size_t>(done), "", done == total);
                                           });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    json out = {{"base", base->model},
                {"model", other->empty() ? base->model : *other},
                {"quant", base->quant.empty() ? json(nullptr) : json(base->quant)},
                {"double_quant", base->double_quant},
                {"text", *text},
                {"tokens", ids.size()},
                {"positions", s.positions},
                {"kld_mean", s.kld_mean},
                {"kld_median", s.kld_median},
                {"kld_p99", s.kld_p99},
                {"kld_max", s.kld_max},
                {"same_top_rate", s.same_top_rate},
                {"ppl_base", s.ppl_base},
                {"ppl_model", s.ppl_model},
                {"weight_bytes_base", reference->weight_bytes()},
                {"weight_bytes_model", model->weight_bytes()},
                {"device", base->device},
                {"seconds", secs}};
    if (*as_json) {
      std::printf("%s\n", out.dump().c_str());
    } else {
      std::printf("positions %lld | KLD mean %.6f median %.6f p99 %.6f max %.6f | same top %.2f%% | PPL base %.4f model %.4f\n",
                  (long long)s.positions, s.kld_mean, s.kld_median, s.kld_p99, s.kld_max, 100.0 * s.same_top_rate,
                  s.ppl_base, s.ppl_model);
    }
    report_peak_memory();
    return 0;
  };
}

namespace {

struct Stats {
  double mean = 0, sd = 0;
};

Stats stats(const std::vector<double>& v) {
  Stats s;
  if (v.empty()) return s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  if (v.size() > 1) {
    for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
    s.sd = std::sqrt(s.sd / static_cast<double>(v.size() - 1));
  }
  return s;
}

// Best-of-3 streaming read of a buffer far larger than the caches, with the bench's threads.
double measure_read_bandwidth(ThreadPool& pool) {
  const int64_t n = int64_t{256} << 20;  // 1 GiB of floats
  std::vector<float> buffer(static_cast<size_t>(n), 1.0f);
  const CpuKernels& k = cpu_kernels();
  const int64_t chunk = int64_t{1} << 20;
  double best = 0.0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<double> partial(static_cast<size_t>(n / chunk));
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(partial.size(), [&](size_t i) { partial[i] = k.sum_read(buffer.data() + i * chunk, chunk); });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double total = 0;
    for (double x : partial) total += x;
    check(total == static_cast<double>(n), "bandwidth probe: wrong sum");
    best = std::max(best, static_cast<double>(n) * sizeof(float) / s / 1e9);
  }
  return best;
}

}  // namespace

Run add_bench(CLI::App& app) {
  auto opts = std::make_shared<Common>();
  auto synthetic = std::make_shared<std::string>();
  auto dtype = std::make_shared<std::string>("bf16");
  auto n_prompt = std::make_shared<int64_t>(512);
  auto n_gen = std::make_shared<int64_t>(128);
  auto reps = std::make_shared<int>(3);
  auto as_json = std::make_shared<bool>(false);
  auto no_bandwidth = std::make_shared<bool>(false);
  auto ctx = std::make_shared<int64_t>(0);
  auto depth = std::make_shared<int64_t>(0);
  auto sequences = std::make_shared<int64_t>(1);
  auto random_rows = std::make_shared<bool>(false);
  auto greedy = std::make_shared<bool>(false);
  add_model_flags(app, *opts, false);
  auto* syn = app.add_option("--synthetic", *synthetic, "random-weight model of a named shape (llama-1b, llama3-8b, ...)");
  app.get_option("--model")->excludes(syn);
  app.add_flag("--random-rows", *random_rows,
               "synthetic: make the weights straight in their target format instead of quantizing random floats "
               "(always so with --device cuda, where they are made in GPU memory)");
  app.add_option("--dtype", *dtype, "weight dtype of a synthetic model: bf16 (default), f16, f32")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}));
  app.add_option("-p,--n-prompt", *n_prompt, "prompt tokens (default 512; 0 skips)")->check(non_negative_number());
  app.add_option("-n,--n-gen", *n_gen, "generated tokens (default 128; 0 skips)")->check(non_negative_number());
  app.add_option("-r,--repetitions", *reps, "repetitions (default 3)")->check(positive_number());
  app.add_flag("--json", *as_json, "print one JSON object");
  app.add_flag("--no-bandwidth", *no_bandwidth, "skip the memory-bandwidth probe");
  app.add_flag("--greedy", *greedy,
               "tg: feed each sequence its top token and hand back only that (as eval's greedy decoding does; on a "
               "GPU it is found there), instead of random tokens with every step's logits");
  app.add_option("--ctx", *ctx, "KV cache capacity in tokens (default: just enough for the test; set it to measure memory at a context)")
      ->check(non_negative_number());
  app.add_option("-d,--depth", *depth,
                 "tokens already in the KV cache when each test starts (default 0; as llama-bench's -d): decode and "
                 "prompt speed at that context")
      ->check(non_negative_number());
  app.add_option("-b,--sequences", *sequences,
                 "sequences decoded together in the tg test (default 1): one step reads the weights once for all; "
                 "t/s counts the tokens of all")
      ->check(CLI::Range(1, 1024));
  return [=]() {
    const int device = check_device(*opts);
    check(!opts->model.empty() || !synthetic->empty(), "give --model PATH or --synthetic NAME");
    // Checked before the model loads (a bad option fails at once, with one line).
    const int64_t needed = *depth + std::max<int64_t>(*n_prompt, *n_gen) + 1;
    check(*ctx == 0 || *ctx >= needed, "--ctx " + std::to_string(*ctx) + " is smaller than the " + std::to_string(needed) +
                                           " positions the test needs");
    check(*n_prompt > 0 || *n_gen > 0, "-p and -n are both 0: nothing to measure");
    ThreadPool pool(opts->threads);
    std::unique_ptr<Model> model;
    std::string name;
    if (!synthetic->empty()) {
      const ModelConfig config = synthetic_config(*synthetic);
      const DType dt = *dtype == "f32" ? DType::F32 : *dtype == "f16" ? DType::F16 : DType::BF16;
      const auto recipe = recipe_of(*opts);
      std::fprintf(stderr, "building synthetic %s (%s, %.2f B parameters)...\n", synthetic->c_str(), dtype->c_str(),
                   static_cast<double>(config.parameter_count()) / 1e9);
      const SyntheticWeights how = device >= 0   ? SyntheticWeights::RandomRowsOnGpu
                                   : *random_rows ? SyntheticWeights::RandomRows
                                                  : SyntheticWeights::Quantized;
      model = make_synthetic_model(config, dt, 1234, pool, recipe ? &*recipe : nullptr, how);
      name = "synthetic:" + *synthetic;
    } else {
      model = open_model(*opts, pool);
      name = opts->model;
    }
    const ModelConfig& c = model->config();
    Decoder decoder(*model, pool, device, apply_gpu_flags(*opts, device), opts->exact);
    // One cache per decoded sequence (the pp test uses the first).
    std::vector<std::unique_ptr<KVCache>> caches;
    for (int64_t i = 0; i < *sequences; ++i) caches.push_back(std::make_unique<KVCache>(c, std::max(needed, *ctx)));
    KVCache& cache = *caches.front();
    std::mt19937 rng(42);
    std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab - 1));
    // Page-locked on a GPU, as eval's and serve's logits are: steps copy logits straight into it.
    HostFloats logits(static_cast<size_t>(c.vocab * *sequences), decoder.gpu() != nullptr);
    using Clock = std::chrono::steady_clock;

    // Empties the caches, then fills each with `depth` random tokens (untimed).
    auto fill_depth = [&]() {
      for (auto& k : caches) {
        k->clear();
        if (*depth == 0) continue;
        std::vector<int32_t> ids(static_cast<size_t>(*depth));
        for (auto& id : ids) id = token(rng);
        decoder.forward(ids.data(), *depth, *k, 1, logits.data());
      }
    };
    auto run_pp = [&]() {
      std::vector<int32_t> ids(static_cast<size_t>(*n_prompt));
      for (auto& id : ids) id = token(rng);
      fill_depth();
      const auto t0 = Clock::now();
      decoder.forward(ids.data(), *n_prompt, cache, 1, logits.data());
      return static_cast<double>(*n_prompt) / std::chrono::duration<double>(Clock::now() - t0).count();
    };
    auto run_tg = [&]() {
      fill_depth();
      std::vector<int32_t> ids(caches.size()), tops(caches.size());
      for (auto& t : tops) t = token(rng);
      std::vector<DecodeSegment> step;
      const auto t0 = Clock::now();
      for (int64_t i = 0; i < *n_gen; ++i) {
        step.clear();
        for (size_t s = 0; s < caches.size(); ++s) {
          if (*greedy) {
            ids[s] = tops[s];
            step.push_back({&ids[s], 1, caches[s].get(), 1, nullptr, &tops[s]});
          } else {
            ids[s] = token(rng);
            step.push_back({&ids[s], 1, caches[s].get(), 1, logits.data() + s * static_cast<size_t>(c.vocab)});
          }
        }
        decoder.forward_batch(step);
      }
      return static_cast<double>(*n_gen * *sequences) / std::chrono::duration<double>(Clock::now() - t0).count();
    };
    std::vector<double> pp, tg;
    if (*n_prompt > 0) {
      run_pp();  // warm-up
      for (int r = 0; r < *reps; ++r) {
        pp.push_back(run_pp());
        std::fprintf(stderr, "pp%lld rep %d/%d: %.2f tok/s\n", (long long)*n_prompt, r + 1, *reps, pp.back());
      }
    }
    if (*n_gen > 0) {
      run_tg();
      for (int r = 0; r < *reps; ++r) {
        tg.push_back(run_tg());
        std::fprintf(stderr, "tg%lld rep %d/%d: %.2f tok/s\n", (long long)*n_gen, r + 1, *reps, tg.back());
      }
    }
    const Stats pps = stats(pp), tgs = stats(tg);
    const double matrix_gb = static_cast<double>(model->matrix_bytes()) / 1e9;
    const double tg_gbps = tgs.mean / static_cast<double>(*sequences) * matrix_gb;  // a step reads the weights once
    // The ceiling of a decode step: the CPU's streaming read, or the GPU's device-to-device copy.
    const double membw = *no_bandwidth ? 0.0 : decoder.gpu() ? cuda_copy_bandwidth(device) : measure_read_bandwidth(pool);
    json out = {{"model", name},
                {"model_type", c.model_type},
                {"parameters", c.parameter_count()},
                {"weight_dtype", model->weight_dtype()},
                {"weight_bytes_per_token", model->matrix_bytes()},
                {"threads", pool.size()},
                {"isa", std::string(decoder.gpu() ? "cuda" : cpu_kernels().isa) + (opts->exact ? " exact" : "")},
                {"n_prompt", *n_prompt},
                {"n_gen", *n_gen},
                {"greedy", *greedy},
                {"depth", *depth},
                {"sequences", *sequences},
                {"repetitions", *reps},
                {"pp_tokens_per_s", pps.mean},
                {"pp_sd", pps.sd},
                {"tg_tokens_per_s", tgs.mean},
                {"tg_sd", tgs.sd},
                {"tg_weight_read_gb_s", tg_gbps},
                {"quant", opts->quant.empty() ? json(nullptr) : json(opts->quant)},
                {"weight_bytes", model->weight_bytes()},
                {"peak_rss_bytes", peak_rss_bytes()}};
    if (decoder.gpu()) {
      const GpuMemory m = decoder.gpu()->memory();
      out["device"] = cuda_device_description(device);
      out["gpu_weight_bytes"] = m.weights;
      out["gpu_kv_bytes"] = m.kv_cache;
      out["kv_cache"] = opts->exact ? "f32" : opts->kv_cache.empty() ? "bf16" : opts->kv_cache;
      out["gpu_prompt_matmuls"] = decoder.gpu()->prompt_matmuls();
      out["gpu_peak_allocated_bytes"] = m.peak_allocated;
      out["gpu_device_peak_used_bytes"] = m.device_used_peak;
      out["gpu_device_used_at_start_bytes"] = m.device_used_at_start;
      if (cuda_memory_limit() > 0) out["gpu_memory_limit_bytes"] = cuda_memory_limit();
    }
    if (membw > 0) {
      out["stream_read_gb_s"] = membw;
      out["tg_bandwidth_fraction"] = tg_gbps / membw;
    }
    if (*as_json) {
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    report_peak_memory();
    report_gpu_memory(decoder);
    std::printf("| model | params | weights | threads | isa | test | t/s |\n|---|---|---|---|---|---|---|\n");
    const double billions = static_cast<double>(c.parameter_count()) / 1e9;
    const std::string at = *depth > 0 ? " @ d" + std::to_string(*depth) : "";
    const std::string times = (*sequences > 1 ? " x " + std::to_string(*sequences) + " seqs" : "") + (*greedy ? " greedy" : "");
    if (*n_prompt > 0)
      std::printf("| %s | %.2f B | %s | %d | %s | pp%lld%s | %.2f ± %.2f |\n", name.c_str(), billions,
                  model->weight_dtype().c_str(), pool.size(), out["isa"].get<std::string>().c_str(), (long long)*n_prompt,
                  at.c_str(), pps.mean, pps.sd);
    if (*n_gen > 0)
      std::printf("| %s | %.2f B | %s | %d | %s | tg%lld%s%s | %.2f ± %.2f |\n", name.c_str(), billions,
                  model->weight_dtype().c_str(), pool.size(), out["isa"].get<std::string>().c_str(), (long long)*n_gen,
                  times.c_str(), at.c_str(), tgs.mean, tgs.sd);
    if (*n_gen > 0) {
      std::printf("tg weight reads: %.2f GB/s", tg_gbps);
      if (membw > 0)
        std::printf(" = %.0f%% of the %.2f GB/s %s", 100.0 * tg_gbps / membw, membw,
                    decoder.gpu() ? "device-to-device copy bandwidth" : "streaming-read bandwidth");
      std::printf("\n");
    }
    return 0;
  };
}

}  // namespace bioquant::cli
