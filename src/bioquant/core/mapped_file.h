// Read-only memory-mapped file. Weights are used straight from the mapping, so a
// model costs no copy and the OS page cache is shared between processes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace bioquant {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws Error when unreadable
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Tells the OS that the whole pages inside [data, data + nbytes) of a read-only mapping are not
// needed any more (they are re-read from the file if touched again).
void release_mapped_range(const uint8_t* data, size_t nbytes);

// Reads a whole (small) file into a string; throws Error naming the path when unreadable.
std::string read_text_file(const std::string& path);

}  // namespace bioquant
