// Byte-permute tables for the GPU's nf4 / fp4 decode: a 16-entry codebook looked up four codes at a
// time by two byte permutes per byte plane, with no select between table halves. Plain C++ (no CUDA
// types): built on the host and checked by the unit tests in every build.
//
// A byte permute (prmt.b32, generic mode) takes 4-bit selectors over the 8 bytes of two registers:
// the low 3 bits pick the byte; the top bit, when set, gives the picked byte's sign instead (0x00 or
// 0xFF). With the code itself as selector, codes 0-7 read table bytes and codes 8-15 read only the
// signs of the same bytes; with the code's top bit flipped, the other way round. So a second table,
// permuted by the flipped codes, completes the first: as signed bytes,
//   code j < 8:  direct[j] - sign(flipped[j])  = level byte of j
//   code j + 8:  flipped[j] - sign(direct[j])  = level byte of j + 8
// where sign(b) is 1 for a negative byte. Each Q1.14 level is split as radix * hi + lo with hi and lo
// signed bytes, and dp4a multiplies each of the four permuted words by the activations: the integer
// sums are exactly those of the 16-bit levels. The select the plain two-half lookup needs (a third
// permute per plane, and the selector's arithmetic) is gone; the extra dp4a issue on the FMA pipe
// beside the integer pipe's permutes.
#pragma once
#include <cstdint>
#include <optional>

namespace bioquant {

struct Bnb4PermuteTables {
  // Byte j of word j / 4 (j < 8): the table byte for code j (direct) or code j + 8 (flipped).
  uint32_t hi_direct[2], hi_flipped[2], lo_direct[2], lo_flipped[2];
  int32_t radix;  // level = radix * hi + lo
};

// Tables for these 16 levels (|level| <= 16384), or nothing when no radix in [130, 256] admits them.
std::optional<Bnb4PermuteTables> bnb4_permute_tables(const int16_t* levels);

// prmt.b32 d, a, b, sel in its generic mode, as the GPU computes it (for the tests and the host's
// own check of the tables).
uint32_t byte_permute(uint32_t a, uint32_t b, uint32_t sel);

// The level of `code` as the GPU kernel reconstructs it from the tables (for the tests).
int32_t bnb4_permuted_level(const Bnb4PermuteTables& t, int code);

}  // namespace bioquant
