// The shipped demo model (models/biomed-tiny) and `bioquant demo`: no training example is an
// evaluated example, and the demo runs every task at every precision.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>

#include <nlohmann/json.hpp>

#include "bioquant/eval/task.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "test_util.h"

namespace bioquant::eval {
namespace {

using nlohmann::json;

std::string model_dir() { return test::fixtures_dir() + "/../../models/biomed-tiny"; }
std::string data_dir() {
  const std::string shared = test::shared_dir();
  return shared.empty() ? "" : shared + "/bionlp";
}

// Inputs (example_key) and own ids of every evaluated example of a task.
struct Evaluated {
  std::set<std::string> keys, ids;
};
Evaluated evaluated(const TaskSpec& task) {
  Evaluated e;
  for (const auto& split : evaluated_splits(task))
    for (const auto& ex : read_split(task, data_dir(), split)) {
      e.keys.insert(example_key(ex));
      e.ids.insert(ex.id);
    }
  return e;
}

TEST(DemoModel, NoTrainingExampleIsAnEvaluatedExample) {
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present";
  // Fine-tuning data: `bioquant prompts --exclude-evaluated` listings of these (task, split) pairs.
  const json ft = json::parse(test::read_file(model_dir() + "/finetune_summary.json"));
  ASSERT_TRUE(ft.contains("training_data"));
  size_t pairs = 0;
  for (const auto& d : ft["training_data"]) {
    const std::string task_name = d["task"], split = d["split"];
    SCOPED_TRACE(task_name + "/" + split);
    const TaskSpec& task = find_task(task_name);
    const auto splits = evaluated_splits(task);
    EXPECT_EQ(std::find(splits.begin(), splits.end(), split), splits.end()) << "trained on an evaluated split";
    // Independently of the listing code: count the split's examples that share an input (or, where
    // the file has its own ids, an id) with an evaluated example. The listing trained on must be
    // exactly the rest.
    const Evaluated ev = evaluated(task);
    const bool own_ids = !task.column("id").empty();
    size_t clean = 0;
    for (const auto& ex : read_split(task, data_dir(), split))
      clean += !(ev.keys.count(example_key(ex)) || (own_ids && ev.ids.count(ex.id)));
    EXPECT_EQ(d["listed"].get<size_t>(), clean);
    EXPECT_LE(d["used"].get<size_t>(), d["listed"].get<size_t>());
    ++pairs;
  }
  EXPECT_EQ(pairs, 12u);
  // The pre-training of the base model read only train/dev files (and dropped units equal to evaluated ones).
  const json base = json::parse(test::read_file(model_dir() + "/training_summary.json"));
  for (const auto& [file, info] : base["data_files"].items()) {
    const std::string name = std::filesystem::path(file).filename().string();
    EXPECT_TRUE(name.rfind("train", 0) == 0 || name.rfind("dev", 0) == 0) << file;
  }
}

TEST(DemoModel, DemoRunsEveryTaskAtEveryPrecision) {
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present";
  test::TempDir dir;
  const auto r = test::run_cli({"demo", "--limit", "2", "--data-dir", data_dir(), "--out", dir.file("demo")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const auto& t : all_tasks()) {
    if (t.source == "builtin") {
      EXPECT_NE(r.out.find(t.name), std::string::npos) << t.name;
    }
  }
  for (const char* p : {"bf16", "int8", "nf4", "q4_k"}) EXPECT_NE(r.out.find(p), std::string::npos) << p;
  const json demo = json::parse(test::read_file(dir.file("demo/demo.json")));
  ASSERT_EQ(demo["precisions"].size(), 4u);
  ASSERT_EQ(demo["tasks"].size(), 8u);
  // 4-bit weights take well under half of the 16-bit weights.
  EXPECT_LT(demo["precisions"][3]["weight_bytes"].get<double>(), 0.5 * demo["precisions"][0]["weight_bytes"].get<double>());
  EXPECT_TRUE(demo["tasks"]["hoc"]["int8"].contains("diff_ci95"));
  // Two examples a task are too few for any change to be called significant (as in the report).
  for (const auto& [task, row] : demo["tasks"].items())
    for (const char* p : {"int8", "nf4", "q4_k"}) EXPECT_FALSE(row[p]["significant"].get<bool>()) << task << " " << p;
  const std::string html = test::read_file(dir.file("demo/report/index.html"));
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find("q4_k"), std::string::npos);
}

// demo --device: an unknown name or a missing GPU is a one-line error before any work; on a GPU the
// table gains each precision's GPU peak.
TEST(DemoModel, DemoOnTheGpuOrAOneLineError) {
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present";
  test::TempDir dir;
  auto r = test::run_cli({"demo", "--device", "tpu", "--data-dir", data_dir(), "--out", dir.file("bad")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("unknown device 'tpu'"), std::string::npos) << r.err;
  r = test::run_cli({"demo", "--device", "cuda", "--limit", "1", "--precisions", "bf16,q4_k", "--tasks", "pubmedqa,hoc",
                     "--batch", "2", "--data-dir", data_dir(), "--out", dir.file("gpu")});
  if (cuda_device_count() == 0) {
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find("device 'cuda' is not available"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir.file("gpu/demo.json")));
    return;
  }
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("GPU peak (MiB)  card peak (MiB)"), std::string::npos) << r.out;
  const json demo = json::parse(test::read_file(dir.file("gpu/demo.json")));
  EXPECT_EQ(demo["device"], "cuda");
  ASSERT_EQ(demo["precisions"].size(), 2u);
  for (const auto& p : demo["precisions"]) {
    EXPECT_GT(p["gpu_peak_allocated_bytes"].get<double>(), 0.0);
    // The card's use adds the CUDA context (and cuBLAS) to our allocations.
    EXPECT_GT(p["gpu_device_peak_bytes"].get<double>(), p["gpu_peak_allocated_bytes"].get<double>() + (50 << 20));
  }
}

}  // namespace
}  // namespace bioquant::eval
