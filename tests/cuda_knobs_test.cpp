// The BIOQUANT_CUDA_* knobs (kernels/cuda/knobs.h), in every build: a knob that is set says something
// valid or is an error naming it; unset and empty mean the default.
#include "bioquant/kernels/cuda/knobs.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "test_util.h"

namespace bioquant {
namespace {

// Sets one variable for the scope (empty value: set to ""), then unsets it.
struct Knob {
  Knob(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~Knob() { unsetenv(name_); }
  Knob(const Knob&) = delete;
  Knob& operator=(const Knob&) = delete;

 private:
  const char* name_;
};

using test::error_of;

TEST(CudaKnobs, IntegerKnobsArePositiveOrAnErrorNamingThem) {
  const char* name = "BIOQUANT_CUDA_TEST_KNOB";
  unsetenv(name);
  EXPECT_EQ(cuda_knob_int(name, 7), 7);
  {
    const Knob k(name, "");
    EXPECT_EQ(cuda_knob_int(name, 7), 7);
  }
  for (const auto& [value, parsed] : {std::pair{"1", 1}, std::pair{"2", 2}, std::pair{"128", 128}, std::pair{"1073741824", 1 << 30}}) {
    const Knob k(name, value);
    EXPECT_EQ(cuda_knob_int(name, 7), parsed) << value;
  }
  for (const char* bad : {"0", "-1", "+2", " 2", "2x", "off", "1073741825", "99999999999999999999"}) {
    const Knob k(name, bad);
    EXPECT_EQ(error_of([&] { cuda_knob_int(name, 7); }),
              std::string(name) + "=" + bad + ": expected a positive integer (unset for the default; a switch's off is 2)");
  }
}

TEST(CudaKnobs, GemmKnobIsZeroMmaOrUnset) {
  unsetenv("BIOQUANT_CUDA_GEMM");
  EXPECT_EQ(cuda_gemm_knob(), "");
  for (const char* good : {"0", "mma"}) {
    const Knob k("BIOQUANT_CUDA_GEMM", good);
    EXPECT_EQ(cuda_gemm_knob(), good);
  }
  const Knob k("BIOQUANT_CUDA_GEMM", "cublas");
  EXPECT_EQ(error_of([] { cuda_gemm_knob(); }),
            "BIOQUANT_CUDA_GEMM=cublas: expected 0 (the integer kernels) or mma (tensor cores without cuBLAS); unset for cuBLAS");
}

TEST(CudaKnobs, StackKnobIsBytesOrUnset) {
  unsetenv("BIOQUANT_CUDA_STACK");
  EXPECT_FALSE(cuda_stack_knob().has_value());
  for (const auto& [value, bytes] : {std::pair{"0", size_t{0}}, std::pair{"1024", size_t{1024}}, std::pair{"1048576", size_t{1} << 20}}) {
    const Knob k("BIOQUANT_CUDA_STACK", value);
    EXPECT_EQ(cuda_stack_knob(), bytes) << value;
  }
  for (const char* bad : {"64k", "-1", "1048577"}) {
    const Knob k("BIOQUANT_CUDA_STACK", bad);
    EXPECT_EQ(error_of([] { cuda_stack_knob(); }), std::string("BIOQUANT_CUDA_STACK=") + bad + ": expected bytes per thread (0 to 1048576)");
  }
}

}  // namespace
}  // namespace bioquant
