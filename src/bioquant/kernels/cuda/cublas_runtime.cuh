// cuBLAS opened at run time (dlopen), for prompts' GEMMs.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <string>

#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/cuda/knobs.h"

namespace bioquant {
namespace {

// cuBLAS, opened at run time: the binary does not depend on a library of hundreds of MB that
// CPU-only machines (and CI) lack; without it (or with BIOQUANT_CUDA_GEMM=0) prompts run on the
// integer kernels.
class Cublas {
 public:
  void open(cudaStream_t stream) {
    if (const std::string knob = cuda_gemm_knob(); knob == "0" || knob == "mma") {
      status_ = "off (BIOQUANT_CUDA_GEMM=" + knob + ")";
      return;
    }
    for (const char* name : {"libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.13", "libcublas.so"}) {
      lib_ = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib_ != nullptr) break;
    }
    if (lib_ == nullptr) {
      status_ = "off (libcublas.so.13 not found)";
      return;
    }
    auto create = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t*)>(dlsym(lib_, "cublasCreate_v2"));
    auto set_stream = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t, cudaStream_t)>(dlsym(lib_, "cublasSetStream_v2"));
    destroy_ = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t)>(dlsym(lib_, "cublasDestroy_v2"));
    gemm_ = reinterpret_cast<decltype(gemm_)>(dlsym(lib_, "cublasGemmEx"));
    batched_ = reinterpret_cast<decltype(batched_)>(dlsym(lib_, "cublasGemmStridedBatchedEx"));
    if (create == nullptr || set_stream == nullptr || destroy_ == nullptr || gemm_ == nullptr ||
        create(&handle_) != CUBLAS_STATUS_SUCCESS || set_stream(handle_, stream) != CUBLAS_STATUS_SUCCESS) {
      status_ = "off (cuBLAS did not initialise)";
      close();
      return;
    }
    status_ = "cuBLAS bf16 GEMM (tensor cores)";
  }
  ~Cublas() { close(); }
  // Closes the handle (its device memory goes back); status says why.
  void release(const std::string& why) {
    close();
    status_ = why;
  }
  bool ready() const { return handle_ != nullptr; }
  bool batched_ready() const { return handle_ != nullptr && batched_ != nullptr; }
  // cuBLAS's own (column-major) terms: C = op(A) op(B), `batch` times with the given element strides;
  // bf16 A and B, f32 C.
  void gemm_batched(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const __nv_bfloat16* a,
                    int64_t lda, int64_t stride_a, const __nv_bfloat16* b, int64_t ldb, int64_t stride_b, float* c, int64_t ldc,
                    int64_t stride_c, int64_t batch) const {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st =
        batched_(handle_, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &one, a, CUDA_R_16BF,
                 static_cast<int>(lda), stride_a, b, CUDA_R_16BF, static_cast<int>(ldb), stride_b, &zero, c, CUDA_R_32F,
                 static_cast<int>(ldc), stride_c, static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) throw Error("cuBLAS batched GEMM failed (status " + std::to_string(static_cast<int>(st)) + ")");
  }
  const std::string& status() const { return status_; }
  // C [n][m] (row-major, ldc) = B [n][k] * A [m][k]^T, bf16 in, f32 out.
  void gemm(int64_t m, int64_t n, int64_t k, const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, int64_t ldc) const {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st = gemm_(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
                                    static_cast<int>(k), &one, a, CUDA_R_16BF, static_cast<int>(k), b, CUDA_R_16BF,
                                    static_cast<int>(k), &zero, c, CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) throw Error("cuBLAS GEMM failed (status " + std::to_string(static_cast<int>(st)) + ")");
  }

 private:
  void close() {
    if (handle_ != nullptr) destroy_(handle_);
    if (lib_ != nullptr) dlclose(lib_);
    handle_ = nullptr;
    lib_ = nullptr;
  }
  void* lib_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  cublasStatus_t (*destroy_)(cublasHandle_t) = nullptr;
  cublasStatus_t (*gemm_)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*, const void*,
                          cudaDataType, int, const void*, cudaDataType, int, const void*, void*, cudaDataType, int,
                          cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*batched_)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*, const void*,
                             cudaDataType, int, long long, const void*, cudaDataType, int, long long, const void*, void*,
                             cudaDataType, int, long long, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  std::string status_ = "off";
};

}  // namespace
}  // namespace bioquant
