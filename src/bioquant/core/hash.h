// Content hashes (SHA-256 via OpenSSL's libcrypto) for fixtures, configs and caches.
#pragma once
#include <string>
#include <string_view>

namespace bioquant {

std::string sha256_hex(std::string_view data);  // 64 lower-case hex digits

}  // namespace bioquant
