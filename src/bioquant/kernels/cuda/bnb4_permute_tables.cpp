#include "bioquant/kernels/cuda/bnb4_permute_tables.h"

#include <array>
#include <vector>

namespace bioquant {
namespace {

int sign_of(int b) { return b < 0 ? 1 : 0; }

// Signed bytes (direct, flipped) with direct - sign(flipped) = a and flipped - sign(direct) = b.
std::optional<std::array<int, 2>> solve_pair(int a, int b) {
  for (int sd = 0; sd < 2; ++sd) {
    for (int sf = 0; sf < 2; ++sf) {
      const int direct = a + sf, flipped = b + sd;
      if (direct < -128 || direct > 127 || flipped < -128 || flipped > 127) continue;
      if (sign_of(direct) == sd && sign_of(flipped) == sf) return std::array<int, 2>{direct, flipped};
    }
  }
  return std::nullopt;
}

// The ways to write level = radix * hi + lo with both signed bytes.
std::vector<std::array<int, 2>> splits(int level, int radix) {
  std::vector<std::array<int, 2>> out;
  for (int lo = -128; lo <= 127; ++lo) {
    if ((level - lo) % radix != 0) continue;
    const int hi = (level - lo) / radix;
    if (hi >= -128 && hi <= 127) out.push_back({hi, lo});
  }
  return out;
}

void put_byte(uint32_t* words, int j, int value) {
  words[j / 4] |= static_cast<uint32_t>(value & 0xFF) << (8 * (j % 4));
}

}  // namespace

uint32_t byte_permute(uint32_t a, uint32_t b, uint32_t sel) {
  const uint64_t pool = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xF;
    uint32_t byte = static_cast<uint32_t>(pool >> (8 * (s & 7))) & 0xFF;
    if (s & 8) byte = (byte & 0x80) ? 0xFF : 0x00;
    d |= byte << (8 * i);
  }
  return d;
}

std::optional<Bnb4PermuteTables> bnb4_permute_tables(const int16_t* levels) {
  for (int radix = 256; radix >= 130; --radix) {
    Bnb4PermuteTables t{};
    t.radix = radix;
    bool ok = true;
    // Codes j and j + 8 share a table byte: choose their splits together.
    for (int j = 0; j < 8 && ok; ++j) {
      bool found = false;
      for (const auto& s0 : splits(levels[j], radix)) {
        for (const auto& s1 : splits(levels[j + 8], radix)) {
          const auto hi = solve_pair(s0[0], s1[0]);
          const auto lo = solve_pair(s0[1], s1[1]);
          if (!hi || !lo) continue;
          put_byte(t.hi_direct, j, (*hi)[0]);
          put_byte(t.hi_flipped, j, (*hi)[1]);
          put_byte(t.lo_direct, j, (*lo)[0]);
          put_byte(t.lo_flipped, j, (*lo)[1]);
          found = true;
          break;
        }
        if (found) break;
      }
      ok = found;
    }
    if (!ok) continue;
    for (int code = 0; code < 16; ++code)
      if (bnb4_permuted_level(t, code) != levels[code]) ok = false;
    if (ok) return t;
  }
  return std::nullopt;
}

int32_t bnb4_permuted_level(const Bnb4PermuteTables& t, int code) {
  // Byte 0 of each permute, as the kernel's dp4a reads it (a signed byte).
  const auto plane = [&](const uint32_t* direct, const uint32_t* flipped) {
    const uint32_t sel = static_cast<uint32_t>(code) & 0xF;
    const auto p = static_cast<int8_t>(byte_permute(direct[0], direct[1], sel) & 0xFF);
    const auto f = static_cast<int8_t>(byte_permute(flipped[0], flipped[1], sel ^ 8) & 0xFF);
    return static_cast<int32_t>(p) + static_cast<int32_t>(f);
  };
  return t.radix * plane(t.hi_direct, t.hi_flipped) + plane(t.lo_direct, t.lo_flipped);
}

}  // namespace bioquant
