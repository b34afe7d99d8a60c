// Device helpers shared by relkd's CUDA kernels. Torch-free.
//
// RELKD_EMULATE builds these units as plain C++ on the CPU, each CUDA thread
// a host thread (tests/cuda_emulation/cuda_emulation.h), so that the CPU-only
// CI runs the kernels' very code against the CPU kernels.
#pragma once

#ifdef RELKD_EMULATE
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include "../pair_math.h"
#include "launchers.h"

namespace relkd {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every relkd kernel

inline cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

// kernel<<<grid, block, 0, stream>>>(args) as RELKD_LAUNCH(grid, block,
// stream, kernel)(args), so that the emulated build can run it.
#ifdef RELKD_EMULATE
#define RELKD_LAUNCH(grid, block, stream, ...) ::relkd_emulation::launch(grid, block, __VA_ARGS__)
#else
#define RELKD_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, as_stream(stream)>>>
#endif

// The same with `bytes` of dynamic shared memory (dynamic_shared below).
#ifdef RELKD_EMULATE
#define RELKD_LAUNCH_SHARED(grid, block, bytes, stream, ...) \
  ::relkd_emulation::launch_shared(grid, block, bytes, __VA_ARGS__)
#else
#define RELKD_LAUNCH_SHARED(grid, block, bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, bytes, as_stream(stream)>>>
#endif

// The block's dynamic shared memory.
template <typename T>
__device__ inline T* dynamic_shared() {
#ifdef RELKD_EMULATE
  return reinterpret_cast<T*>(::relkd_emulation::dynamic_shared_memory.data());
#else
  extern __shared__ __align__(16) unsigned char relkd_dynamic_shared[];
  return reinterpret_cast<T*>(relkd_dynamic_shared);
#endif
}

// Status of the last launch (a launch error, e.g. a bad configuration,
// surfaces here; errors inside a kernel surface at the next synchronising
// call, where torch reports them).
inline int launched() { return static_cast<int>(cudaGetLastError()); }

// Lets `kernel` launch with `bytes` of dynamic shared memory, which with its
// static shared memory may pass the default 48 KiB: 0 or a cudaError_t code.
// A failure is also cleared from the runtime's last error, which the next
// launch check (relkd's `launched()`, or torch's with a shared cudart) would
// otherwise report as its own.
template <typename Kernel>
inline int allow_dynamic_shared(Kernel kernel, size_t bytes) {
#ifdef RELKD_EMULATE
  (void)kernel;
  (void)bytes;
  return 0;
#else
  const cudaError_t status = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (status != cudaSuccess) (void)cudaGetLastError();
  return static_cast<int>(status);
#endif
}

// Whether a block with `bytes` of shared memory (static and dynamic) can
// launch on `device` (its opt-in limit per block). The emulation has no
// device: `emulated_limit` stands in, set so that its tests reach both
// sides.
inline bool shared_memory_fits(int device, size_t bytes, size_t emulated_limit) {
#ifdef RELKD_EMULATE
  (void)device;
  return bytes <= emulated_limit;
#else
  (void)emulated_limit;
  int most = 0;
  return cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) ==
             cudaSuccess &&
         bytes <= static_cast<size_t>(most);
#endif
}

__host__ __device__ inline int64_t blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return b < 1 ? 1 : b;
}

// Sum of one value per thread over the block, in a fixed order (a tree over
// shared memory): deterministic for a fixed block size. All threads must
// call it; the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const T out = shared[0];
  __syncthreads();
  return out;
}

// Exclusive prefix sum of one int per thread over the block (threads in
// order); *total receives the sum. Deterministic positions for compaction.
// Each warp scans its lanes by shuffles; the warps' totals meet in
// shared[0 .. 8): two barriers, where a scan over shared memory takes 16.
// All threads must call it.
__device__ inline int block_exclusive_scan(int v, int* shared, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = v;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int below = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += below;
  }
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kThreads / 32; ++w) {  // the same order in every thread
    const int warp_total = shared[w];
    if (w < warp) before += warp_total;
    sum += warp_total;
  }
  *total = sum;
  __syncthreads();  // shared is free for the next call
  return before + inclusive - v;
}

// The pair weight of the tile element (r, c) (pm::pair_weight on global
// positions, ids and labels).
__device__ inline int tile_weight(const TileMask& m, int64_t p, int64_t q) {
  const int64_t id_p = m.ids_r ? m.ids_r[p] : p;
  const int64_t id_q = m.ids_c ? m.ids_c[q] : q;
  const int64_t lab_p = m.lab_r ? m.lab_r[p] : 0;
  const int64_t lab_q = m.lab_c ? m.lab_c[q] : 0;
  return pm::pair_weight(static_cast<pm::Mask>(m.mask), m.symmetric, p, q, id_p, id_q, lab_p,
                         lab_q);
}

}  // namespace cuda
}  // namespace relkd
