// GGUF v2/v3 reader: header, metadata (as JSON values plus their GGUF types) and tensor
// infos, all validated against the file before use. Vocabulary-only files (no tensors) are fine.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bioquant/core/mapped_file.h"

namespace bioquant {

enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12,
};

struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> dims;  // fastest-varying first (GGUF order)
  uint32_t ggml_type = 0;
  uint64_t offset = 0;         // relative to the data section
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

// Block size (elements) and bytes per block of a ggml type; false if the type is unknown.
bool ggml_type_layout(uint32_t ggml_type, int64_t* block_elems, int64_t* block_bytes);
const char* ggml_type_name(uint32_t ggml_type);

// A path to read as GGUF: one ending in .gguf (missing or not, so that its reader says what is wrong), or a
// regular file that starts with GGUF's magic whatever its name (llama.cpp's files are often named *.bin).
bool is_gguf_path(const std::string& path);

class GgufFile {
 public:
  explicit GgufFile(const std::string& path);  // throws Error on any inconsistency

  uint32_t version() const { return version_; }
  const nlohmann::json& metadata() const { return metadata_; }    // key -> value
  GgufValueType type_of(const std::string& key) const;             // of the value (ARRAY for arrays)
  bool has(const std::string& key) const { return metadata_.contains(key); }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  const std::string& path() const { return file_->path(); }

  // Typed metadata access with a clear error when missing or of the wrong kind.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;

 private:
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  nlohmann::json metadata_ = nlohmann::json::object();
  std::map<std::string, GgufValueType> types_;
  std::vector<GgufTensorInfo> tensors_;
};

// What write_gguf stores: metadata values with their GGUF types, and tensors.
struct GgufWriteValue {
  GgufValueType type;                       // ARRAY: elements of `element_type`
  GgufValueType element_type = GgufValueType::U8;
  nlohmann::json value;
};
struct GgufWriteTensor {
  std::string name;
  std::vector<uint64_t> dims;  // fastest-varying first
  uint32_t ggml_type = 0;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};

// Writes a GGUF v3 file (alignment 32) through a temporary file renamed into place, so `path`
// is never left half-written. Metadata keys are written in the given order.
void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufWriteValue>>& metadata,
                const std::vector<GgufWriteTensor>& tensors);

}  // namespace bioquant
