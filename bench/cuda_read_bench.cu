// The read floor of the decode matvecs: kernels that only read (XOR) the bytes of each q4_k matrix of
// the Llama-3-8B shape, launched one per matrix like the real ones, in three access patterns
// (grid-stride sequential, a row per warp, the q4_k kernel's lanes). Their best time over 20 launches,
// each on another region of a 2 GiB buffer (so L2 never holds the matrix), bounds what a decode kernel of
// that size can reach with one launch per matrix, whatever its arithmetic. Then eight layers' matrices
// read by one launch per matrix against one resident grid with a barrier between matrices (what a
// persistent decode kernel would be), with and without each warp's next loads issued before a barrier.
// Last, what one dependency between steps costs by itself: an empty kernel's boundary in a CUDA graph
// (plain, or a programmatic dependent launch as the decoder's) against a grid barrier.
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

// A grid-wide barrier for a kernel whose blocks are all resident (cooperative launch): `counter` counts
// arrivals over the whole launch (zeroed before it), the n-th barrier waits for n * gridDim.x.
__device__ void grid_barrier(unsigned* counter, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    unsigned seen = 0;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter));
    } while (seen < target);
  }
  __syncthreads();
}

struct Phase {
  const uint8_t* w;
  size_t row_bytes;
  int64_t rows, pairs;
};
constexpr int kMaxPhases = 32;
struct Phases {
  Phase p[kMaxPhases];
  int count;
};

__device__ uint32_t q4k_pair_xor(const uint8_t* row, int64_t p) {
  const uint8_t* blk = row + 144 * (p / 4);
  const uint4 h = *reinterpret_cast<const uint4*>(blk);
  const uint4* qs = reinterpret_cast<const uint4*>(blk + 16 + 32 * (p % 4));
  const uint4 a = qs[0], b = qs[1];
  return h.x ^ a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
}

// The matrices of several layers read one after another by one resident grid, a grid barrier between
// matrices (as a persistent decode kernel would need between dependent matvecs), each warp taking rows
// as the q4_k kernel's lanes do. kPrefetch: before waiting at a barrier, a warp loads its first row's
// first two pairs of the next matrix (weights do not depend on the barrier), used after it.
template <bool kPrefetch>
__global__ void persistent_read(Phases ph, unsigned* counter, uint32_t* out) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  uint32_t acc = 0, pre = 0;
  for (int i = 0; i < ph.count; ++i) {
    const Phase& f = ph.p[i];
    int64_t first_pair = 0;
    if (kPrefetch && i > 0 && warp < f.rows) first_pair = 2;  // taken before the barrier
    acc ^= pre;
    pre = 0;
    for (int64_t r = warp; r < f.rows; r += warps) {
      const uint8_t* row = f.w + r * f.row_bytes;
      for (int64_t p = lane + (r == warp ? 32 * first_pair : 0); p < f.pairs; p += 32) acc ^= q4k_pair_xor(row, p);
    }
    if (i + 1 < ph.count) {
      if (kPrefetch) {
        const Phase& n = ph.p[i + 1];
        if (warp < n.rows)
          for (int k = 0; k < 2; ++k)
            if (lane + 32 * k < n.pairs) pre ^= q4k_pair_xor(n.w + warp * n.row_bytes, lane + 32 * k);
      }
      grid_barrier(counter, static_cast<unsigned>(i + 1) * gridDim.x);
    }
  }
  keep(acc ^ pre, out);
}

// One step of a chain of empty kernels: with `dependent`, as the decoder's decode kernels are launched
// (programmatic dependent launch: the next kernel may start at once, then waits for this one), else a
// plain launch. Block 0 adds one to *out, so each step reads what the one before wrote.
__global__ void empty_step(int dependent, uint32_t* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (dependent) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
#endif
  if (blockIdx.x == 0 && threadIdx.x == 0) *out += 1;
}

// The same steps as grid barriers inside one resident grid.
__global__ void barrier_steps(int steps, unsigned* counter, uint32_t* out) {
  for (int i = 0; i < steps; ++i) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *out += 1;
    grid_barrier(counter, static_cast<unsigned>(i + 1) * gridDim.x);
  }
}

// What one dependency between decode steps costs when nothing else runs: a kernel boundary in a CUDA
// graph (plain or programmatic dependent launch) against a grid barrier, `blocks` blocks of 256 threads.
bool boundary_costs(int blocks, uint32_t* out) {
  constexpr int kSteps = 256;
  cudaStream_t stream;
  if (!ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream")) return false;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const auto time_best = [&](auto&& run) {
    float best = 1e30f;
    for (int rep = 0; rep < 10; ++rep) {
      cudaEventRecord(start, stream);
      run();
      cudaEventRecord(stop, stream);
      if (!ok(cudaEventSynchronize(stop), "boundary steps")) return -1.0f;
      float ms = 0.0f;
      cudaEventElapsedTime(&ms, start, stop);
      if (ms < best) best = ms;
    }
    return best * 1e3f / kSteps;
  };
  float per_step[3] = {0, 0, 0};
  for (int dependent = 0; dependent < 2; ++dependent) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    if (!ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture")) return false;
    for (int i = 0; i < kSteps; ++i) {
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(blocks));
      config.blockDim = dim3(256);
      config.stream = stream;
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      if (dependent) {
        config.attrs = &attr;
        config.numAttrs = 1;
      }
      if (!ok(cudaLaunchKernelEx(&config, empty_step, dependent, out), "step launch")) return false;
    }
    if (!ok(cudaStreamEndCapture(stream, &graph), "capture end") ||
        !ok(cudaGraphInstantiate(&exec, graph, 0), "graph instantiate"))
      return false;
    per_step[dependent] = time_best([&] { cudaGraphLaunch(exec, stream); });
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  unsigned* counter = nullptr;
  if (!ok(cudaMalloc(&counter, 4), "counter")) return false;
  per_step[2] = time_best([&] {
    cudaMemsetAsync(counter, 0, 4, stream);
    int steps = kSteps;
    void* args[] = {&steps, &counter, &out};
    ok(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(barrier_steps), dim3(static_cast<unsigned>(blocks)), dim3(256),
                                   args, 0, stream),
       "cooperative launch");
  });
  cudaFree(counter);
  std::printf("%4d blocks: a step costs %.2f us as a plain launch in a graph, %.2f us as a dependent launch, %.2f us "
              "as a grid barrier\n",
              blocks, per_step[0], per_step[1], per_step[2]);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
  return true;
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
  // Eight layers' four matrices (q+k+v, o, gate+up, down: 122.7 MB a layer): one launch per matrix
  // against one resident grid with a barrier between matrices, with and without the next matrix's
  // first loads issued before each barrier.
  {
    const int layers = 8;
    const Shape order[] = {shapes[2], shapes[3], shapes[0], shapes[1]};
    size_t layer_bytes = 0;
    for (const Shape& sh : order) layer_bytes += static_cast<size_t>(sh.cols / 256 * 144) * sh.rows;
    const int regions = static_cast<int>(total / (layers * layer_bytes));
    unsigned* counter = nullptr;
    if (!ok(cudaMalloc(&counter, 4), "counter")) return 1;
    int per_sm = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, persistent_read<true>, 1024, 0);
    const unsigned grid = static_cast<unsigned>(prop.multiProcessorCount * (per_sm > 0 ? 1 : 0));
    const char* names[] = {"a launch per matrix", "resident grid, barriers", "resident grid, barriers, prefetch"};
    for (int mode = 0; mode < 3; ++mode) {
      float best = 1e30f;
      for (int rep = 0; rep < 20; ++rep) {
        const uint8_t* base = buf + (rep % regions) * layers * layer_bytes;
        Phases ph{};
        ph.count = 4 * layers;
        size_t off = 0;
        for (int l = 0; l < layers; ++l)
          for (int m = 0; m < 4; ++m) {
            const Shape& sh = order[m];
            const size_t rb = static_cast<size_t>(sh.cols / 256 * 144);
            ph.p[4 * l + m] = {base + off, rb, sh.rows, sh.cols / 64};
            off += rb * sh.rows;
          }
        cudaMemset(counter, 0, 4);
        cudaEventRecord(start);
        if (mode == 0) {
          for (int i = 0; i < ph.count; ++i)
            q4k_lanes_read<<<static_cast<unsigned>((ph.p[i].rows + 7) / 8), 256>>>(ph.p[i].w, ph.p[i].row_bytes, ph.p[i].rows,
                                                                                   ph.p[i].pairs, out);
        } else {
          void* args[] = {&ph, &counter, &out};
          const void* fn = mode == 1 ? reinterpret_cast<const void*>(persistent_read<false>)
                                     : reinterpret_cast<const void*>(persistent_read<true>);
          if (!ok(cudaLaunchCooperativeKernel(fn, grid, 1024, args, 0, nullptr), "cooperative launch")) return 1;
        }
        cudaEventRecord(stop);
        if (!ok(cudaEventSynchronize(stop), "layers")) return 1;
        float ms = 0.0f;
        cudaEventElapsedTime(&ms, start, stop);
        if (ms < best) best = ms;
      }
      std::printf("%d layers, %-36s %8.2f us (%6.2f us a layer, %6.0f GB/s)\n", layers, names[mode], best * 1e3,
                  best * 1e3 / layers, layers * layer_bytes / (best * 1e-3) / 1e9);
    }
    cudaFree(counter);
  }
  // Then what a dependency between steps costs by itself (empty steps).
  for (const int per_sm : {1, 2, 4})
    if (!boundary_costs(prop.multiProcessorCount * per_sm, out)) return 1;
  cudaFree(buf);
  cudaFree(out);
  return 0;
}
