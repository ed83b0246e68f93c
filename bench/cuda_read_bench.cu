// The read floor of the decode matvecs: kernels that only read (XOR) the bytes of each q4_k matrix of
// the Llama-3-8B shape, launched one per matrix like the real ones, in three access patterns
// (grid-stride sequential, a row per warp, the q4_k kernel's lanes). Their best time over 20 launches,
// each on another region of a 2 GiB buffer (so L2 never holds the matrix), bounds what a decode kernel of
// that size can reach with one launch per matrix, whatever its arithmetic.
// Usage: build/bench/bioquant_cuda_read_bench (a GPU needed).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace {

bool ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) std::fprintf(stderr, "bioquant_cuda_read_bench: %s: %s\n", what, cudaGetErrorString(e));
  return e == cudaSuccess;
}

// The XOR of everything read goes to *out only on an impossible value, so the loads are not removed.
__device__ void keep(uint32_t acc, uint32_t* out) {
  if (acc == 0x9E3779B9u) *out = acc;
}

__global__ void sequential_read(const uint4* p, size_t n, uint32_t* out) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  keep(acc, out);
}

__global__ void row_per_warp_read(const uint8_t* w, size_t row_bytes, int64_t rows, uint32_t* out) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  if (r >= rows) return;
  const uint4* row = reinterpret_cast<const uint4*>(w + r * row_bytes);
  uint32_t acc = 0;
  for (size_t c = threadIdx.x % 32; c < row_bytes / 16; c += 32) {
    const uint4 v = row[c];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  keep(acc, out);
}

// Lane p of a row's warp reads pair p: its super-block's 16-byte header and 32 bytes of qs.
__global__ void q4k_lanes_read(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t pairs, uint32_t* out) {
  const int64_t r = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  if (r >= rows) return;
  const uint8_t* row = w + r * row_bytes;
  uint32_t acc = 0;
  for (int64_t p = threadIdx.x % 32; p < pairs; p += 32) {
    const uint8_t* blk = row + 144 * (p / 4);
    const uint4 h = *reinterpret_cast<const uint4*>(blk);
    const uint4* qs = reinterpret_cast<const uint4*>(blk + 16 + 32 * (p % 4));
    const uint4 a = qs[0], b = qs[1];
    acc ^= h.x ^ a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
  }
  keep(acc, out);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bioquant_cuda_read_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  if (!ok(cudaGetDeviceProperties(&prop, 0), "device properties")) return 1;
  const size_t total = size_t{2} << 30;
  uint8_t* buf = nullptr;
  uint32_t* out = nullptr;
  if (!ok(cudaMalloc(&buf, total), "2 GiB buffer") || !ok(cudaMalloc(&out, 4), "output") ||
      !ok(cudaMemset(buf, 1, total), "fill"))
    return 1;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::printf("%s, %d SMs; q4_k matrices of the Llama-3-8B shape, best of 20 launches\n", prop.name,
              prop.multiProcessorCount);
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"gate+up", 28672, 4096}, {"down", 4096, 14336}, {"q+k+v", 6144, 4096}, {"o", 4096, 4096}};
  const char* patterns[] = {"sequential", "row per warp", "q4_k lanes"};
  for (const Shape& s : shapes) {
    const size_t row_bytes = static_cast<size_t>(s.cols / 256 * 144), bytes = row_bytes * s.rows;
    const int regions = static_cast<int>(total / bytes);
    for (int pattern = 0; pattern < 3; ++pattern) {
      float best = 1e30f;
      for (int rep = 0; rep < 20; ++rep) {
        const uint8_t* w = buf + (rep % regions) * bytes;
        const unsigned grid = static_cast<unsigned>((s.rows + 7) / 8);
        cudaEventRecord(start);
        if (pattern == 0) sequential_read<<<prop.multiProcessorCount * 8, 256>>>(reinterpret_cast<const uint4*>(w), bytes / 16, out);
        if (pattern == 1) row_per_warp_read<<<grid, 256>>>(w, row_bytes, s.rows, out);
        if (pattern == 2) q4k_lanes_read<<<grid, 256>>>(w, row_bytes, s.rows, s.cols / 64, out);
        cudaEventRecord(stop);
        if (!ok(cudaEventSynchronize(stop), "kernel")) return 1;
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, start, stop);
        if (ms < best) best = ms;
      }
      std::printf("%-8s %5.1f MB  %-12s %7.2f us  %6.0f GB/s\n", s.name, bytes / 1e6, patterns[pattern], best * 1e3,
                  bytes / (best * 1e-3) / 1e9);
    }
  }
  cudaFree(buf);
  cudaFree(out);
  return 0;
}
