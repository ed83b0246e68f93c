#include "bioquant/model/quantize.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "bioquant/core/error.h"
#include "bioquant/model/model.h"

namespace bioquant {

namespace {

bool is_bnb(QuantType t) { return t == QuantType::INT8 || t == QuantType::NF4 || t == QuantType::FP4; }
bool is_plain(QuantType t) { return t == QuantType::F32 || t == QuantType::F16 || t == QuantType::BF16; }

// llama.cpp's use_more_bits(): the first and last eighth of the layers and every third in between.
bool more_bits_layer(int64_t layer, int64_t n_layers) {
  return layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2;
}

// The nearest format that fits rows of `cols` (see the header), or `stored` when none does.
QuantType fallback(QuantType want, int64_t cols, QuantType stored, std::string& note) {
  if (quant_fits(want, cols)) return want;
  QuantType next = stored;
  switch (want) {
    case QuantType::Q4_K: next = QuantType::Q4_0; break;
    case QuantType::Q5_K:
    case QuantType::Q6_K: next = QuantType::Q8_0; break;
    case QuantType::NF4:
    case QuantType::FP4: next = QuantType::INT8; break;
    default: break;
  }
  if (!quant_fits(next, cols)) next = stored;
  note = std::string(quant_traits(want).name) + " needs rows of whole " + std::to_string(quant_traits(want).block_elems) +
         "-element blocks (" + std::to_string(cols) + " columns): " + quant_traits(next).name + " instead";
  return next;
}

}  // namespace

std::string quant_names_list() {
  std::string s;
  for (int i = 0; i < kQuantTypeCount; ++i) s += std::string(i ? " " : "") + quant_traits(static_cast<QuantType>(i)).name;
  return s + " q4_k_m";
}

QuantRecipe parse_quant_recipe(const std::string& name, bool double_quant, const std::string& policy) {
  QuantRecipe r;
  std::string lower = name;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  r.name = lower;
  if (lower == "q4_k_m") {
    r.base = QuantType::Q4_K;
    r.q4_k_m = true;
  } else {
    const auto t = parse_quant_type(lower);
    check(t.has_value(), "unknown quant type '" + name + "' (choose from: " + quant_names_list() + ")");
    r.base = *t;
  }
  check(!double_quant || r.base == QuantType::NF4 || r.base == QuantType::FP4, "--double-quant applies to nf4 and fp4 only");
  r.double_quant = double_quant;
  if (policy == "default") {
    r.policy = QuantPolicy::Default;
  } else if (policy == "all") {
    r.policy = QuantPolicy::All;
  } else if (policy == "linear") {
    r.policy = QuantPolicy::Linear;
  } else {
    throw Error("unknown quant policy '" + policy + "' (choose from: default all linear)");
  }
  return r;
}

std::vector<TensorPlan> plan_quantization(const Model& model, const QuantRecipe& r) {
  std::vector<TensorPlan> plan;
  const int64_t n_layers = model.config().n_layers;
  for (const auto& [name, m] : model.named_matrices()) {
    TensorPlan p;
    p.name = name;
    p.rows = m->rows;
    p.cols = m->cols;
    p.from = m->type;
    const bool is_embedding = name == "embedding", is_output = name == "output";
    QuantType want = r.base;
    if (is_embedding || is_output) {
      const bool quantize = r.policy == QuantPolicy::All || is_plain(r.base) ||
                            (r.policy == QuantPolicy::Default && !is_bnb(r.base));
      if (!quantize) want = m->type;
      // llama.cpp gives the output projection q6_k (q8_0 files keep q8_0).
      if (quantize && r.policy == QuantPolicy::Default && !is_plain(r.base) && !is_bnb(r.base) && r.base != QuantType::Q8_0 &&
          (is_output || (is_embedding && model.config().tie_embeddings)))
        want = QuantType::Q6_K;
    } else if (r.q4_k_m) {
      const size_t dot = name.find('.', 7);
      const int64_t layer = std::stoll(name.substr(7, dot - 7));
      const std::string role = name.substr(dot + 1);
      // (phi3's v rows live in one fused qkv tensor with q and k, so they keep its format.)
      const bool fused_v = role == "attn_v" && model.config().fused_qkv;
      if ((role == "attn_v" || role == "ffn_down") && !fused_v && more_bits_layer(layer, n_layers)) want = QuantType::Q6_K;
    }
    p.double_quant = r.double_quant && (want == QuantType::NF4 || want == QuantType::FP4);
    p.to = fallback(want, p.cols, m->type, p.note);
    if (p.to != want) p.double_quant = false;
    if (p.to == QuantType::INT8) p.outlier_threshold = r.int8_threshold;
    plan.push_back(p);
  }
  return plan;
}

std::string requantization_note(const std::vector<TensorPlan>& plan) {
  size_t count = 0;
  std::set<std::string> from;
  for (const TensorPlan& p : plan) {
    if (is_plain(p.from) || p.to == p.from) continue;
    ++count;
    from.insert(quant_traits(p.from).name);
  }
  if (count == 0) return "";
  std::string formats;
  for (const auto& f : from) formats += (formats.empty() ? "" : ", ") + f;
  return std::to_string(count) + " of " + std::to_string(plan.size()) + " matrices are stored quantized already (" +
         formats + "); they are quantized again from their dequantized values: two roundings, not what quantizing "
         "the original 16-bit weights gives";
}

void quantize_matrix(Model& model, Matrix& m, const TensorPlan& p, ThreadPool& pool, bool release_source) {
  m.outlier_threshold = p.outlier_threshold;
  if (p.to == m.type && p.double_quant == m.double_quant) return;
  const size_t row_bytes = quant_row_bytes(p.to, m.cols, p.double_quant);
  auto storage = std::make_unique<uint8_t[]>(row_bytes * static_cast<size_t>(m.rows));
  const Matrix src = m;
  constexpr int64_t kRowsPerTask = 64;
  const int64_t n_tasks = (m.rows + kRowsPerTask - 1) / kRowsPerTask;
  pool.parallel_for(static_cast<size_t>(n_tasks), [&](size_t task) {
    std::vector<float> row(static_cast<size_t>(src.cols));
    const int64_t begin = static_cast<int64_t>(task) * kRowsPerTask, end = std::min(src.rows, begin + kRowsPerTask);
    for (int64_t r = begin; r < end; ++r) {
      src.row_to_f32(r, row.data());
      quantize_row(p.to, row.data(), src.cols, storage.get() + static_cast<size_t>(r) * row_bytes, p.double_quant);
    }
  });
  m.type = p.to;
  m.double_quant = p.double_quant;
  m.data = storage.get();
  model.adopt(std::move(storage));
  if (release_source) model.release_source_bytes(src.data, src.nbytes());
}

void quantize_model(Model& model, const std::vector<TensorPlan>& plan, ThreadPool& pool,
                    const std::function<void(int64_t done, int64_t total)>& progress) {
  auto matrices = model.named_matrices();
  check(matrices.size() == plan.size(), "quantize_model: plan does not match the model");
  const bool tied_shared = model.config().tie_embeddings && model.weights().output.data == model.weights().embed.data;
  const auto changes = [&](size_t i) {
    const Matrix& m = *matrices[i].second;
    return plan[i].to != m.type || plan[i].double_quant != m.double_quant;
  };
  int64_t total = 0, done = 0;
  for (size_t i = 0; i < plan.size(); ++i)
    if (changes(i)) total += plan[i].rows * plan[i].cols;
  if (total > 0 && progress) progress(0, total);
  for (size_t i = 0; i < plan.size(); ++i) {
    check(matrices[i].first == plan[i].name, "quantize_model: plan order differs from the model");
    const bool changed = changes(i);
    // The tied embedding's pages stay mapped: the output may still read them until it is retied.
    const bool keep = tied_shared && plan[i].name == "embedding";
    quantize_matrix(model, *matrices[i].second, plan[i], pool, !keep);
    if (changed && progress) progress(done += plan[i].rows * plan[i].cols, total);
  }
  if (tied_shared) model.retie_output();
}

}  // namespace bioquant
