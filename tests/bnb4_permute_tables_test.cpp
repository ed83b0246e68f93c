// The byte-permute tables of the GPU's nf4 / fp4 decode (kernels/cuda/bnb4_permute_tables.h): the
// kernel's arithmetic emulated on the host must give the integer sums of the 16-bit Q1.14 levels.
#include "bioquant/kernels/cuda/bnb4_permute_tables.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>

#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

void q14_levels(const float* codebook, int16_t* out) {  // as the GPU decoder uploads them
  for (int i = 0; i < 16; ++i) out[i] = static_cast<int16_t>(std::nearbyint(codebook[i] * 16384.0f));
}

int dp4a(uint32_t a, uint32_t b, int c) {  // signed bytes
  for (int i = 0; i < 4; ++i)
    c += static_cast<int8_t>((a >> (8 * i)) & 0xFF) * static_cast<int8_t>((b >> (8 * i)) & 0xFF);
  return c;
}

TEST(Bnb4PermuteTables, BytePermuteIsPrmtGenericMode) {
  const uint32_t a = 0x83020100u, b = 0x07F60504u;
  EXPECT_EQ(byte_permute(a, b, 0x3210u), a);
  EXPECT_EQ(byte_permute(a, b, 0x7654u), b);
  EXPECT_EQ(byte_permute(a, b, 0x0415u), 0x00040105u);
  // Top bit: the picked byte's sign, replicated (bytes 3 = 0x83 and 6 = 0xF6 are negative).
  EXPECT_EQ(byte_permute(a, b, 0xBE98u), 0xFFFF0000u);
  EXPECT_EQ(byte_permute(a, b, 0xFFFF3210u), a);  // sel[31:16] unused
}

TEST(Bnb4PermuteTables, KernelSumsEqualTheLevelsSums) {
  for (const float* codebook : {nf4_codebook(), fp4_codebook()}) {
    int16_t levels[16];
    q14_levels(codebook, levels);
    const auto t = bnb4_permute_tables(levels);
    ASSERT_TRUE(t.has_value());
    for (int code = 0; code < 16; ++code) EXPECT_EQ(bnb4_permuted_level(*t, code), levels[code]) << code;
    std::mt19937 rng(7);
    for (int trial = 0; trial < 20000; ++trial) {
      const uint32_t extremes[] = {0x7F7F7F7Fu, 0x80808080u, 0x807F807Fu};  // then random activations
      const uint32_t w = rng(), x = trial < 3 ? extremes[trial] : rng();
      // The kernel: codes 0-3 of w against x (the low half of w selects).
      const uint32_t flipped = w ^ 0x88888888u;
      const int hi = dp4a(byte_permute(t->hi_flipped[0], t->hi_flipped[1], flipped),
                          x, dp4a(byte_permute(t->hi_direct[0], t->hi_direct[1], w), x, 0));
      const int lo = dp4a(byte_permute(t->lo_flipped[0], t->lo_flipped[1], flipped),
                          x, dp4a(byte_permute(t->lo_direct[0], t->lo_direct[1], w), x, 0));
      int want = 0;
      for (int i = 0; i < 4; ++i)
        want += levels[(w >> (4 * i)) & 0xF] * static_cast<int8_t>((x >> (8 * i)) & 0xFF);
      ASSERT_EQ(t->radix * hi + lo, want) << std::hex << w << " " << x;
    }
  }
}

TEST(Bnb4PermuteTables, RandomCodebooksWithinQ14AreSplitExactly) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> level(-16384, 16384);
  int built = 0;
  for (int trial = 0; trial < 500; ++trial) {
    int16_t levels[16];
    for (auto& l : levels) l = static_cast<int16_t>(level(rng));
    if (trial % 5 == 0) levels[trial % 16] = 16384;
    const auto t = bnb4_permute_tables(levels);
    if (!t) continue;
    ++built;
    for (int code = 0; code < 16; ++code) ASSERT_EQ(bnb4_permuted_level(*t, code), levels[code]);
  }
  // A pair of codes fails a radix only with a byte of 127 on one side; some radix in [130, 256] suits all.
  EXPECT_EQ(built, 500);
}

}  // namespace
}  // namespace bioquant
