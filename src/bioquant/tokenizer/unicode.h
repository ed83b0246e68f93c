// UTF-8 helpers, Unicode normalisation (utf8proc) and the GPT-2 byte <-> unicode map.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace bioquant::unicode {

// Length in bytes of the UTF-8 sequence starting with lead byte `c` (1 for invalid leads).
int utf8_length(unsigned char c);
// Appends the UTF-8 encoding of `cp`.
void append_utf8(std::string& out, uint32_t cp);
// Decodes the code point at s[i] and advances i; invalid bytes decode as themselves (0x80..0xFF) one at a time.
uint32_t next_code_point(std::string_view s, size_t& i);
// Bytes of `s` that form complete UTF-8 characters from the start (the rest is an incomplete tail).
size_t complete_utf8_prefix(std::string_view s);
// Replaces invalid UTF-8 with U+FFFD, one per maximal invalid subpart (as Rust's from_utf8_lossy).
std::string to_valid_utf8(std::string_view s);

std::string nfc(std::string_view s);
std::string nfkc(std::string_view s);
std::string nfd(std::string_view s);
std::string lowercase(std::string_view s);

// GPT-2's reversible map of the 256 byte values onto printable code points.
const std::string& byte_to_unicode(uint8_t b);  // UTF-8 of the mapped code point
// Inverse: -1 when `cp` is not one of the 256 mapped code points.
int unicode_to_byte(uint32_t cp);

}  // namespace bioquant::unicode
