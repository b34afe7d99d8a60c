// A small CPU emulation of the CUDA features relkd's kernels use, so that
// the CPU-only CI runs the kernels' own code (csrc/cuda/*.cu built as C++
// with -DRELKD_EMULATE) and tests/test_cuda_emulated.py compares it with the
// CPU kernels. Each CUDA thread of a block is a host thread; blocks run one
// after the other. Emulated: thread / block indices, __syncthreads (a block
// barrier), __shared__ memory (a static: one block at a time), warp
// shuffles and __match_any_sync (a warp barrier and an exchange slot per
// lane), atomicAdd (std::atomic_ref). Not emulated: the GPU's speed, its
// memory model beyond what the barriers order, and launch failures.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

namespace relkd_emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

constexpr int kWarpSize = 32;

// What the threads of the running block share.
struct Block {
  std::barrier<> block_sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> exchange;  // one slot per thread, for warp operations

  explicit Block(unsigned threads)
      : block_sync(threads), exchange(threads) {
    for (unsigned w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w)
      warp_sync.push_back(std::make_unique<std::barrier<>>(kWarpSize));
  }
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;
inline thread_local Block* current_block = nullptr;

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "exchange slots hold 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Runs kernel(args...) on a grid of `grid` blocks of `threads` threads.
template <typename... Params>
struct Launcher {
  long long grid, threads;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    grid_dim = {static_cast<unsigned>(grid), 1, 1};
    block_dim = {static_cast<unsigned>(threads), 1, 1};
    for (long long b = 0; b < grid; ++b) {
      Block block(static_cast<unsigned>(threads));
      std::vector<std::thread> workers;
      workers.reserve(threads);
      for (long long t = 0; t < threads; ++t)
        workers.emplace_back([&, b, t] {
          thread_idx = {static_cast<unsigned>(t), 0, 0};
          block_idx = {static_cast<unsigned>(b), 0, 0};
          current_block = &block;
          kernel(static_cast<Params>(args)...);  // by value, as a launch passes them
        });
      for (auto& w : workers) w.join();
    }
  }
};

template <typename... Params>
Launcher<Params...> launch(long long grid, long long threads, void (*kernel)(Params...)) {
  return {grid, threads, kernel};
}

inline int lane() { return static_cast<int>(thread_idx.x % kWarpSize); }
inline std::barrier<>& warp_barrier() { return *current_block->warp_sync[thread_idx.x / kWarpSize]; }
inline uint64_t* warp_slots() {
  return current_block->exchange.data() + (thread_idx.x / kWarpSize) * kWarpSize;
}

}  // namespace relkd_emulation

#define threadIdx (::relkd_emulation::thread_idx)
#define blockIdx (::relkd_emulation::block_idx)
#define blockDim (::relkd_emulation::block_dim)
#define gridDim (::relkd_emulation::grid_dim)

inline void __syncthreads() { relkd_emulation::current_block->block_sync.arrive_and_wait(); }

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// Every lane of the warp must call the warp operations together (as on the
// GPU with a full mask).
template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  using namespace relkd_emulation;
  uint64_t* slots = warp_slots();
  slots[lane()] = to_bits(value);
  warp_barrier().arrive_and_wait();
  const int source = lane() + offset;
  const T out = source < kWarpSize ? from_bits<T>(slots[source]) : value;
  warp_barrier().arrive_and_wait();
  return out;
}

template <typename T>
unsigned __match_any_sync(unsigned, T value) {
  using namespace relkd_emulation;
  uint64_t* slots = warp_slots();
  slots[lane()] = to_bits(value);
  warp_barrier().arrive_and_wait();
  unsigned same = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if (slots[l] == to_bits(value)) same |= 1u << l;
  warp_barrier().arrive_and_wait();
  return same;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
