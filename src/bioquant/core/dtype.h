// Storage element types of tensors as they appear in files.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace bioquant {

enum class DType { F32, F16, BF16, F64, I8, U8, I16, I32, I64, BOOL };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", ...
bool parse_safetensors_dtype(const std::string& name, DType* out);

// A typed, non-owning view of contiguous row-major tensor data.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int32_t ggml_type = -1;  // GGUF block-quantized data (dtype is then U8 raw bytes); -1 otherwise
  std::string format;      // quantized storage ("q4_k", "nf4+dq", ...; rows self-contained); "" = plain dtype

  int64_t numel() const;
};

std::string shape_string(const std::vector<int64_t>& shape);

}  // namespace bioquant
