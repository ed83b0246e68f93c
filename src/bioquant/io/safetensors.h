// safetensors reader: 8-byte little-endian header length, JSON header, data buffer.
// Every header entry is validated against the file before any tensor is handed out.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bioquant/core/dtype.h"
#include "bioquant/core/mapped_file.h"

namespace bioquant {

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws Error on any inconsistency

  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const TensorView* find(const std::string& name) const;
  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
};

// Writes tensors as a safetensors file (header keys sorted, data in that order, 8-byte aligned
// header). Written to a temporary file then renamed, so `path` is never left half-written.
void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors);

}  // namespace bioquant
