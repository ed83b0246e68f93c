#include "bioquant/io/tensor_source.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <new>

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

void SafetensorsModelFiles::release(const uint8_t* data, size_t nbytes) const { release_mapped_range(data, nbytes); }

MemoryTensors::~MemoryTensors() {
  for (auto& [name, e] : tensors_) {
    if (e.mapped) {
      ::munmap(e.bytes, e.capacity);
    } else {
      delete[] e.bytes;
    }
  }
}

uint8_t* MemoryTensors::add(const std::string& name, DType dtype, std::vector<int64_t> shape) {
  check(!tensors_.count(name), "tensor '" + name + "' added twice");
  Entry e;
  e.view.name = name;
  e.view.dtype = dtype;
  e.view.shape = std::move(shape);
  e.view.nbytes = static_cast<size_t>(e.view.numel()) * dtype_size(dtype);
  e.capacity = std::max<size_t>(e.view.nbytes, 1);
  if (e.capacity >= (size_t{1} << 20)) {
    void* p = ::mmap(nullptr, e.capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    e.bytes = static_cast<uint8_t*>(p);
    e.mapped = true;
  } else {
    e.bytes = new uint8_t[e.capacity]();
  }
  e.view.data = e.bytes;
  uint8_t* out = e.bytes;
  tensors_.emplace(name, std::move(e));
  return out;
}

const TensorView* MemoryTensors::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.view;
}

size_t MemoryTensors::mapped_bytes() const {
  size_t total = 0;
  for (const auto& [name, e] : tensors_) total += e.view.nbytes;
  return total;
}

void MemoryTensors::release(const uint8_t* data, size_t nbytes) const {
  for (const auto& [name, e] : tensors_) {
    if (e.mapped && data >= e.bytes && data + nbytes <= e.bytes + e.capacity) {
      release_mapped_range(data, nbytes);  // anonymous pages read back as zeros afterwards
      return;
    }
  }
}

}  // namespace bioquant
