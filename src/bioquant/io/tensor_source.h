// Where weights come from: the safetensors files of a model directory (single or sharded),
// or tensors held in memory (synthetic models, tests). The model binder only sees this.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bioquant/core/dtype.h"
#include "bioquant/io/safetensors.h"

namespace bioquant {

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual const TensorView* find(const std::string& name) const = 0;
  virtual size_t mapped_bytes() const { return 0; }
  // The caller no longer needs these bytes (a tensor that was converted): mapped sources let the
  // OS drop the pages; in-memory sources keep them (they may be shared).
  virtual void release(const uint8_t* data, size_t nbytes) const { (void)data, (void)nbytes; }
};

// model.safetensors, or model.safetensors.index.json plus the shards its weight_map names.
class SafetensorsModelFiles : public TensorSource {
 public:
  explicit SafetensorsModelFiles(const std::string& dir);
  const TensorView* find(const std::string& name) const override;
  size_t mapped_bytes() const override;
  void release(const uint8_t* data, size_t nbytes) const override;
  size_t file_count() const { return files_.size(); }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// Tensors owned in memory, zero-filled; large ones live in anonymous mappings so pages cost
// memory only once written, and release() gives them back.
class MemoryTensors : public TensorSource {
 public:
  ~MemoryTensors() override;
  // Allocates a zeroed tensor and returns its writable bytes.
  uint8_t* add(const std::string& name, DType dtype, std::vector<int64_t> shape);
  const TensorView* find(const std::string& name) const override;
  size_t mapped_bytes() const override;
  void release(const uint8_t* data, size_t nbytes) const override;

 private:
  struct Entry {
    TensorView view;
    uint8_t* bytes = nullptr;
    size_t capacity = 0;
    bool mapped = false;
  };
  std::map<std::string, Entry> tensors_;
};

bool file_exists(const std::string& path);

}  // namespace bioquant
