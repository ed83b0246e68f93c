#include "bioquant/io/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <set>
#include <nlohmann/json.hpp>
#include <vector>

#include "bioquant/core/atomic_file.h"
#include "bioquant/core/error.h"

namespace bioquant {

using nlohmann::json;

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  const uint8_t* base = file_->data();
  const size_t size = file_->size();
  check(size >= 8, path + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | base[i];
  check(header_len <= size - 8, path + ": truncated safetensors file (header of " + std::to_string(header_len) +
                                    " bytes, file has " + std::to_string(size) + ")");
  json header;
  std::string duplicate;
  std::set<std::string> seen;
  // A JSON object may legally repeat a key; a safetensors header must not (which data would be meant?).
  const json::parser_callback_t note_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  try {
    header = json::parse(base + 8, base + 8 + header_len, note_duplicates);
  } catch (const json::exception&) {
    throw Error(path + ": corrupt safetensors header: not valid JSON");
  }
  check(header.is_object(), path + ": corrupt safetensors header: not a JSON object");
  check(duplicate.empty(), path + ": corrupt safetensors header: tensor '" + duplicate + "' listed twice");
  const uint8_t* buffer = base + 8 + header_len;
  const size_t buffer_size = size - 8 - header_len;

  struct Span {
    size_t begin, end;
    std::string name;
  };
  std::vector<Span> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& entry = it.value();
    const std::string where = path + ": tensor '" + name + "'";
    check(entry.is_object() && entry.contains("dtype") && entry.contains("shape") && entry.contains("data_offsets"),
          where + ": header entry lacks dtype/shape/data_offsets");
    TensorView view;
    view.name = name;
    check(entry["dtype"].is_string() && parse_safetensors_dtype(entry["dtype"].get<std::string>(), &view.dtype),
          where + ": unknown dtype " + entry["dtype"].dump());
    check(entry["shape"].is_array(), where + ": shape is not an array");
    uint64_t numel = 1;
    for (const json& d : entry["shape"]) {
      check(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
            where + ": bad dimension " + d.dump());
      const uint64_t dim = d.get<uint64_t>();
      check(dim == 0 || numel <= (uint64_t{1} << 48) / dim, where + ": shape too large");
      numel *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& offsets = entry["data_offsets"];
    check(offsets.is_array() && offsets.size() == 2 && offsets[0].is_number_unsigned() &&
              offsets[1].is_number_unsigned(),
          where + ": data_offsets must be two non-negative integers");
    const uint64_t begin = offsets[0].get<uint64_t>();
    const uint64_t end = offsets[1].get<uint64_t>();
    check(begin <= end, where + ": data_offsets end before begin");
    check(end <= buffer_size, where + ": data [" + std::to_string(begin) + ", " + std::to_string(end) +
                                  ") points past the end of the file (data buffer holds " +
                                  std::to_string(buffer_size) + " bytes; file truncated?)");
    check(end - begin == numel * dtype_size(view.dtype),
          where + ": " + std::to_string(end - begin) + " bytes do not match shape " + shape_string(view.shape) +
              " of " + dtype_name(view.dtype));
    view.data = buffer + begin;
    view.nbytes = end - begin;
    spans.push_back({begin, end, name});
    tensors_.emplace(name, std::move(view));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i) {
    check(spans[i].begin >= spans[i - 1].end,
          path + ": tensors '" + spans[i - 1].name + "' and '" + spans[i].name + "' overlap");
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorView>& tensors) {
  std::vector<const TensorView*> order;
  for (const TensorView& t : tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) { return a->name < b->name; });
  json header = json::object();
  uint64_t offset = 0;
  for (const TensorView* t : order) {
    check(!header.contains(t->name), "write_safetensors: tensor '" + t->name + "' given twice");
    check(t->nbytes == static_cast<size_t>(t->numel()) * dtype_size(t->dtype),
          "write_safetensors: tensor '" + t->name + "' size does not match its shape");
    header[t->name] = {{"dtype", dtype_name(t->dtype)}, {"shape", t->shape}, {"data_offsets", {offset, offset + t->nbytes}}};
    offset += t->nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // pad so the data buffer starts 8-byte aligned
  write_file_atomically(path, [&](std::ostream& out) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const TensorView* t : order) out.write(reinterpret_cast<const char*>(t->data), static_cast<std::streamsize>(t->nbytes));
  });
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

}  // namespace bioquant
