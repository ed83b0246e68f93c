#include "bioquant/tokenizer/unicode.h"

#include <utf8proc.h>

#include <array>
#include <cstdlib>
#include <unordered_map>

#include "bioquant/core/error.h"

namespace bioquant::unicode {

int utf8_length(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xe0) == 0xc0) return 2;
  if ((c & 0xf0) == 0xe0) return 3;
  if ((c & 0xf8) == 0xf0) return 4;
  return 1;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

uint32_t next_code_point(std::string_view s, size_t& i) {
  utf8proc_int32_t cp = 0;
  const utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                              static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  if (n <= 0) {
    return static_cast<unsigned char>(s[i++]);
  }
  i += static_cast<size_t>(n);
  return static_cast<uint32_t>(cp);
}

size_t complete_utf8_prefix(std::string_view s) {
  // Only the last <= 3 bytes can be an unfinished character.
  size_t end = s.size();
  for (size_t back = 1; back <= 4 && back <= s.size(); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xc0) == 0x80) continue;  // continuation byte: keep looking for the lead
    const int need = utf8_length(c);
    if (c >= 0xc0 && static_cast<size_t>(need) > back) end = s.size() - back;
    break;
  }
  return end;
}

std::string to_valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    utf8proc_int32_t cp = 0;
    const utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                                static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
    if (n > 0) {
      out.append(s.substr(i, static_cast<size_t>(n)));
      i += static_cast<size_t>(n);
      continue;
    }
    // Skip the maximal prefix of a valid sequence (lead + fitting continuation bytes), emit one U+FFFD.
    const unsigned char lead = static_cast<unsigned char>(s[i]);
    size_t len = 1;
    const int want = utf8_length(lead);
    if (lead >= 0xc2 && lead <= 0xf4 && want > 1) {
      while (len < static_cast<size_t>(want) && i + len < s.size()) {
        const unsigned char c = static_cast<unsigned char>(s[i + len]);
        unsigned char lo = 0x80, hi = 0xbf;
        if (len == 1) {
          if (lead == 0xe0) lo = 0xa0;
          if (lead == 0xed) hi = 0x9f;
          if (lead == 0xf0) lo = 0x90;
          if (lead == 0xf4) hi = 0x8f;
        }
        if (c < lo || c > hi) break;
        ++len;
      }
    }
    out += "\xef\xbf\xbd";
    i += len;
  }
  return out;
}

namespace {

std::string map_with(std::string_view s, int options) {
  if (s.empty()) return std::string();
  utf8proc_uint8_t* result = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &result,
                                          static_cast<utf8proc_option_t>(options));
  if (n < 0) {
    // Invalid UTF-8 cannot be normalised: keep the input as is, as the byte-level models do.
    return std::string(s);
  }
  std::string out(reinterpret_cast<char*>(result), static_cast<size_t>(n));
  std::free(result);
  return out;
}

}  // namespace

std::string nfc(std::string_view s) { return map_with(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE); }
std::string nfkc(std::string_view s) { return map_with(s, UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT); }
std::string nfd(std::string_view s) { return map_with(s, UTF8PROC_STABLE | UTF8PROC_DECOMPOSE); }

std::string lowercase(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i < s.size()) append_utf8(out, static_cast<uint32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(next_code_point(s, i)))));
  return out;
}

namespace {

struct ByteMap {
  std::array<std::string, 256> to_unicode;
  std::unordered_map<uint32_t, int> to_byte;
  ByteMap() {
    // Printable Latin-1 bytes map to themselves; the rest to 256, 257, ... in byte order.
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : next++;
      append_utf8(to_unicode[static_cast<size_t>(b)], cp);
      to_byte[cp] = b;
    }
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

}  // namespace

const std::string& byte_to_unicode(uint8_t b) { return byte_map().to_unicode[b]; }

int unicode_to_byte(uint32_t cp) {
  const auto& m = byte_map().to_byte;
  auto it = m.find(cp);
  return it == m.end() ? -1 : it->second;
}

}  // namespace bioquant::unicode
