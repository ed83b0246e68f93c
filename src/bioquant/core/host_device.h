// Functions shared by host code and CUDA device code (the CUDA backend reuses the formats'
// bit-level helpers rather than repeating them).
#pragma once

#if defined(__CUDACC__)
#define BQ_HOST_DEVICE __host__ __device__
#else
#define BQ_HOST_DEVICE
#endif
