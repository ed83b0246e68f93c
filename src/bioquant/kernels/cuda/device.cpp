#include <string>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant {

int parse_device_name(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() < 9 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos)
    return std::stoi(device.substr(5));
  throw Error("unknown device '" + device + "' (cpu, cuda or cuda:N)");
}

int parse_device(const std::string& device) {
  const int index = parse_device_name(device);
  if (index < 0) return index;
  const int n = cuda_device_count();
#ifdef BIOQUANT_HAVE_CUDA
  check(index < n, "device '" + device + "' is not available: " + std::to_string(n) + " CUDA device(s) found");
#else
  (void)n;
  throw Error("device '" + device + "' is not available: this build has no CUDA backend (configure with -DBIOQUANT_CUDA=ON)");
#endif
  return index;
}

KvType parse_kv_type(const std::string& name) {
  if (name == "f32") return KvType::F32;
  if (name == "bf16") return KvType::BF16;
  if (name == "q8") return KvType::Q8;
  throw Error("unknown KV cache type '" + name + "' (f32, bf16 or q8)");
}

}  // namespace bioquant
