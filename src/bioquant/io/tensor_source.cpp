#include "bioquant/io/tensor_source.h"

#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <set>

#include "bioquant/core/error.h"

namespace bioquant {

using nlohmann::json;

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

SafetensorsModelFiles::SafetensorsModelFiles(const std::string& dir) {
  const std::string single = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (file_exists(index_path)) {
    json index;
    try {
      index = json::parse(read_text_file(index_path));
    } catch (const json::exception&) {
      throw Error(index_path + ": not valid JSON");
    }
    check(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
          index_path + ": missing 'weight_map'");
    std::map<std::string, const SafetensorsFile*> shards;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      check(it.value().is_string(), index_path + ": weight_map values must be file names");
      const std::string shard = it.value().get<std::string>();
      check(shard.find('/') == std::string::npos && shard != ".." && !shard.empty(),
            index_path + ": shard name '" + shard + "' is not a plain file name");
      if (!shards.count(shard)) {
        files_.push_back(std::make_unique<SafetensorsFile>(dir + "/" + shard));
        shards[shard] = files_.back().get();
      }
      const TensorView* view = shards[shard]->find(it.key());
      check(view != nullptr, index_path + ": tensor '" + it.key() + "' is not in shard " + shard);
      index_[it.key()] = view;
    }
    return;
  }
  check(file_exists(single), dir + ": no model.safetensors or model.safetensors.index.json");
  files_.push_back(std::make_unique<SafetensorsFile>(single));
  for (const auto& [name, view] : files_.back()->tensors()) index_[name] = &view;
}

const TensorView* SafetensorsModelFiles::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

size_t SafetensorsModelFiles::mapped_bytes() const {
  size_t total = 0;
  for (const auto& [name, view] : index_) total += view->nbytes;
  return total;
}

uint8_t* MemoryTensors::add(const std::string& name, DType dtype, std::vector<int64_t> shape) {
  TensorView view;
  view.name = name;
  view.dtype = dtype;
  view.shape = std::move(shape);
  view.nbytes = static_cast<size_t>(view.numel()) * dtype_size(dtype);
  auto bytes = std::make_unique<uint8_t[]>(view.nbytes);  // value-initialised: zeros
  view.data = bytes.get();
  uint8_t* out = bytes.get();
  tensors_[name] = {std::move(view), std::move(bytes)};
  return out;
}

const TensorView* MemoryTensors::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.first;
}

size_t MemoryTensors::mapped_bytes() const {
  size_t total = 0;
  for (const auto& [name, entry] : tensors_) total += entry.first.nbytes;
  return total;
}

}  // namespace bioquant
