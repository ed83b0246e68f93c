#include "bioquant/io/gguf.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "bioquant/core/atomic_file.h"
#include "bioquant/core/error.h"

namespace bioquant {

bool is_gguf_path(const std::string& path) {
  if (path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0) return true;
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  char magic[4] = {};
  std::ifstream in(path, std::ios::binary);
  return in.read(magic, 4) && std::memcmp(magic, "GGUF", 4) == 0;
}

using nlohmann::json;

namespace {

struct TypeLayout {
  uint32_t id;
  const char* name;
  int64_t block_elems, block_bytes;
};

const TypeLayout kTypes[] = {
    {0, "F32", 1, 4},       {1, "F16", 1, 2},       {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},    {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292}, {24, "I8", 1, 1},       {25, "I16", 1, 2},
    {26, "I32", 1, 4},      {27, "I64", 1, 8},      {28, "F64", 1, 8},      {30, "BF16", 1, 2},
    // llama.cpp's importance-matrix formats: read (so a model names them), not computed in.
    {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74}, {18, "IQ3_XXS", 256, 98}, {19, "IQ1_S", 256, 50},
    {20, "IQ4_NL", 32, 18},   {21, "IQ3_S", 256, 110}, {22, "IQ2_S", 256, 82},   {23, "IQ4_XS", 256, 136},
    {29, "IQ1_M", 256, 56},
};

// Bounds-checked little-endian cursor over the mapped file.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::string& path) : data_(data), size_(size), path_(path) {}

  void need(uint64_t n, const char* what) const {
    if (n > size_ - pos_) throw Error(path_ + ": truncated GGUF file (while reading " + what + ")");
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const char* what) {
    const uint64_t n = get<uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }
  size_t pos() const { return pos_; }
  void seek(size_t p) { pos_ = p; }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

json read_scalar(Reader& r, GgufValueType t, const std::string& path, const std::string& key) {
  switch (t) {
    case GgufValueType::U8: return r.get<uint8_t>("value");
    case GgufValueType::I8: return r.get<int8_t>("value");
    case GgufValueType::U16: return r.get<uint16_t>("value");
    case GgufValueType::I16: return r.get<int16_t>("value");
    case GgufValueType::U32: return r.get<uint32_t>("value");
    case GgufValueType::I32: return r.get<int32_t>("value");
    case GgufValueType::F32: return r.get<float>("value");
    case GgufValueType::BOOL: return r.get<uint8_t>("value") != 0;
    case GgufValueType::STRING: return r.string("string value");
    case GgufValueType::U64: return r.get<uint64_t>("value");
    case GgufValueType::I64: return r.get<int64_t>("value");
    case GgufValueType::F64: return r.get<double>("value");
    case GgufValueType::ARRAY: break;
  }
  throw Error(path + ": metadata '" + key + "' has unknown value type " + std::to_string(static_cast<uint32_t>(t)));
}

}  // namespace

bool ggml_type_layout(uint32_t ggml_type, int64_t* block_elems, int64_t* block_bytes) {
  for (const TypeLayout& t : kTypes) {
    if (t.id == ggml_type) {
      *block_elems = t.block_elems;
      *block_bytes = t.block_bytes;
      return true;
    }
  }
  return false;
}

const char* ggml_type_name(uint32_t ggml_type) {
  for (const TypeLayout& t : kTypes)
    if (t.id == ggml_type) return t.name;
  return "unknown";
}

GgufFile::GgufFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  Reader r(file_->data(), file_->size(), path);
  r.need(4, "magic");
  check(std::memcmp(file_->data(), "GGUF", 4) == 0, path + ": not a GGUF file (bad magic)");
  r.seek(4);
  version_ = r.get<uint32_t>("version");
  check(version_ == 2 || version_ == 3, path + ": unsupported GGUF version " + std::to_string(version_));
  const uint64_t n_tensors = r.get<uint64_t>("tensor count");
  const uint64_t n_kv = r.get<uint64_t>("metadata count");
  // Each entry needs at least a few bytes: reject absurd counts before allocating anything.
  check(n_tensors <= file_->size() / 8 && n_kv <= file_->size() / 8, path + ": corrupt GGUF header (counts exceed file)");
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = r.string("metadata key");
    const auto type = static_cast<GgufValueType>(r.get<uint32_t>("metadata type"));
    check(!metadata_.contains(key), path + ": metadata key '" + key + "' appears twice");
    if (type == GgufValueType::ARRAY) {
      const auto elem = static_cast<GgufValueType>(r.get<uint32_t>("array type"));
      const uint64_t count = r.get<uint64_t>("array length");
      check(elem != GgufValueType::ARRAY, path + ": nested arrays in '" + key + "' are not supported");
      check(count <= file_->size() - r.pos(), path + ": truncated GGUF file (array '" + key + "')");
      json arr = json::array();
      for (uint64_t j = 0; j < count; ++j) arr.push_back(read_scalar(r, elem, path, key));
      metadata_[key] = std::move(arr);
    } else {
      metadata_[key] = read_scalar(r, type, path, key);
    }
    types_[key] = type;
  }
  uint64_t alignment = 32;
  if (metadata_.contains("general.alignment")) {
    check(metadata_["general.alignment"].is_number_unsigned(), path + ": general.alignment must be an unsigned integer");
    alignment = metadata_["general.alignment"].get<uint64_t>();
    check(alignment > 0 && (alignment & (alignment - 1)) == 0, path + ": general.alignment must be a power of two");
  }
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = r.string("tensor name");
    const uint32_t n_dims = r.get<uint32_t>("tensor dims");
    check(n_dims >= 1 && n_dims <= 4, path + ": tensor '" + t.name + "' has " + std::to_string(n_dims) + " dimensions");
    for (uint32_t d = 0; d < n_dims; ++d) t.dims.push_back(r.get<uint64_t>("tensor dim"));
    t.ggml_type = r.get<uint32_t>("tensor type");
    t.offset = r.get<uint64_t>("tensor offset");
    tensors_.push_back(std::move(t));
  }
  const uint64_t data_start = (r.pos() + alignment - 1) / alignment * alignment;
  const uint64_t data_size = file_->size() >= data_start ? file_->size() - data_start : 0;
  for (GgufTensorInfo& t : tensors_) {
    int64_t block_elems = 0, block_bytes = 0;
    check(ggml_type_layout(t.ggml_type, &block_elems, &block_bytes),
          path + ": tensor '" + t.name + "' has unknown ggml type " + std::to_string(t.ggml_type));
    uint64_t numel = 1;
    for (uint64_t d : t.dims) {
      check(d > 0 && d < (uint64_t{1} << 40) && numel <= (uint64_t{1} << 48) / d, path + ": tensor '" + t.name + "' has a bad shape");
      numel *= d;
    }
    check(t.dims[0] % static_cast<uint64_t>(block_elems) == 0,
          path + ": tensor '" + t.name + "' rows of " + std::to_string(t.dims[0]) + " do not fill whole " +
              ggml_type_name(t.ggml_type) + " blocks");
    t.nbytes = numel / static_cast<uint64_t>(block_elems) * static_cast<uint64_t>(block_bytes);
    check(t.offset % alignment == 0, path + ": tensor '" + t.name + "' offset is not aligned");
    check(t.offset <= data_size && t.nbytes <= data_size - t.offset,
          path + ": tensor '" + t.name + "' points past the end of the file (truncated?)");
    t.data = file_->data() + data_start + t.offset;
  }
}

GgufValueType GgufFile::type_of(const std::string& key) const {
  auto it = types_.find(key);
  check(it != types_.end(), path() + ": no metadata '" + key + "'");
  return it->second;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  for (const GgufTensorInfo& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

std::string GgufFile::get_string(const std::string& key) const {
  check(metadata_.contains(key) && metadata_[key].is_string(), path() + ": metadata '" + key + "' missing or not a string");
  return metadata_[key].get<std::string>();
}

int64_t GgufFile::get_int(const std::string& key) const {
  check(metadata_.contains(key) && metadata_[key].is_number_integer(),
        path() + ": metadata '" + key + "' missing or not an integer");
  return metadata_[key].get<int64_t>();
}

}  // namespace bioquant

namespace bioquant {

namespace {

class Writer {
 public:
  explicit Writer(std::ostream& out) : out_(out) {}
  template <class T>
  void put(T v) {
    out_.write(reinterpret_cast<const char*>(&v), sizeof v);
    pos_ += sizeof v;
  }
  void string(const std::string& s) {
    put<uint64_t>(s.size());
    out_.write(s.data(), static_cast<std::streamsize>(s.size()));
    pos_ += s.size();
  }
  void bytes(const uint8_t* p, size_t n) {
    out_.write(reinterpret_cast<const char*>(p), static_cast<std::streamsize>(n));
    pos_ += n;
  }
  void pad_to(size_t alignment) {
    static const char zeros[64] = {};
    const size_t pad = (alignment - pos_ % alignment) % alignment;
    out_.write(zeros, static_cast<std::streamsize>(pad));
    pos_ += pad;
  }
  size_t pos() const { return pos_; }

 private:
  std::ostream& out_;
  size_t pos_ = 0;
};

void write_scalar(Writer& w, GgufValueType t, const json& v, const std::string& key) {
  switch (t) {
    case GgufValueType::U8: w.put<uint8_t>(v.get<uint8_t>()); return;
    case GgufValueType::I8: w.put<int8_t>(v.get<int8_t>()); return;
    case GgufValueType::U16: w.put<uint16_t>(v.get<uint16_t>()); return;
    case GgufValueType::I16: w.put<int16_t>(v.get<int16_t>()); return;
    case GgufValueType::U32: w.put<uint32_t>(v.get<uint32_t>()); return;
    case GgufValueType::I32: w.put<int32_t>(v.get<int32_t>()); return;
    case GgufValueType::F32: w.put<float>(v.get<float>()); return;
    case GgufValueType::BOOL: w.put<uint8_t>(v.get<bool>() ? 1 : 0); return;
    case GgufValueType::STRING: w.string(v.get<std::string>()); return;
    case GgufValueType::U64: w.put<uint64_t>(v.get<uint64_t>()); return;
    case GgufValueType::I64: w.put<int64_t>(v.get<int64_t>()); return;
    case GgufValueType::F64: w.put<double>(v.get<double>()); return;
    case GgufValueType::ARRAY: break;
  }
  throw Error("write_gguf: '" + key + "': nested arrays are not supported");
}

}  // namespace

void write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufWriteValue>>& metadata,
                const std::vector<GgufWriteTensor>& tensors) {
  constexpr size_t kAlignment = 32;
  write_file_atomically(path, [&](std::ostream& out) {
    Writer w(out);
    w.bytes(reinterpret_cast<const uint8_t*>("GGUF"), 4);
    w.put<uint32_t>(3);
    w.put<uint64_t>(tensors.size());
    w.put<uint64_t>(metadata.size());
    for (const auto& [key, value] : metadata) {
      w.string(key);
      w.put<uint32_t>(static_cast<uint32_t>(value.type));
      if (value.type == GgufValueType::ARRAY) {
        check(value.value.is_array(), "write_gguf: '" + key + "' is not an array");
        w.put<uint32_t>(static_cast<uint32_t>(value.element_type));
        w.put<uint64_t>(value.value.size());
        for (const json& e : value.value) write_scalar(w, value.element_type, e, key);
      } else {
        write_scalar(w, value.type, value.value, key);
      }
    }
    uint64_t offset = 0;
    for (const GgufWriteTensor& t : tensors) {
      int64_t be = 0, bb = 0;
      check(ggml_type_layout(t.ggml_type, &be, &bb), "write_gguf: tensor '" + t.name + "' has unknown ggml type");
      uint64_t numel = 1;
      for (uint64_t d : t.dims) numel *= d;
      check(!t.dims.empty() && t.dims[0] % static_cast<uint64_t>(be) == 0 &&
                numel / static_cast<uint64_t>(be) * static_cast<uint64_t>(bb) == t.nbytes,
            "write_gguf: tensor '" + t.name + "' size does not match its dims and type");
      w.string(t.name);
      w.put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) w.put<uint64_t>(d);
      w.put<uint32_t>(t.ggml_type);
      w.put<uint64_t>(offset);
      offset += (t.nbytes + kAlignment - 1) / kAlignment * kAlignment;
    }
    w.pad_to(kAlignment);
    for (const GgufWriteTensor& t : tensors) {
      w.bytes(t.data, t.nbytes);
      w.pad_to(kAlignment);
    }
  });
}

}  // namespace bioquant
