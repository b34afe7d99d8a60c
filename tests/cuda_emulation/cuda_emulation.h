// A small CPU emulation of the CUDA features relkd's kernels use, so that
// the CPU-only CI runs the kernels' own code (csrc/cuda/*.cu built as C++
// with -DRELKD_EMULATE) and tests/test_cuda_emulated.py compares it with the
// CPU kernels. Each CUDA thread of a block is a host thread; blocks run one
// after the other. Emulated: thread / block indices, __syncthreads (a block
// barrier), __shared__ memory (a static: one block at a time; dynamic
// shared memory one buffer), warp shuffles, __ballot_sync and
// __match_any_sync (a warp barrier and an exchange slot per lane), the bf16 tensor-core mma.m16n8k16 (fragments exchanged the same
// way, read where the PTX ISA's tables place them), ldmatrix .x4 (row
// addresses exchanged the same way; .trans too), atomicAdd and atomicMin
// (std::atomic_ref), cp.async's 16-byte copies (landing at the
// wait_group that covers them, the latest the GPU allows, so a read before
// that wait sees the old bytes; or, after copies_land_early = true, as
// they are issued, the earliest; a thread ending with copies in flight
// aborts). Not emulated: the GPU's speed, its
// memory model beyond what the barriers order, and launch failures.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
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

// What the block knows of a 16-byte chunk of shared memory that cp.async
// writes (a race check of the staging: see check_copy_issue / check_read).
struct ChunkState {
  long long read_interval = -1;  // the last barrier interval that read it
  int reader = -1;               // the thread that read it then (-2: several)
  bool in_flight = false;        // a copy issued, not yet waited for
  long long landed_interval = -1;
  int writer = -1;               // the thread of the last copy
};

// What the threads of the running block share.
struct Block {
  std::mutex chunk_lock;
  std::unordered_map<uintptr_t, ChunkState> chunks;
  std::barrier<> block_sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp_sync;
  std::vector<uint64_t> exchange;  // one slot per thread, for warp operations
  std::vector<uint32_t> fragments;  // 6 registers per thread (A and B), for mma

  explicit Block(unsigned threads)
      : block_sync(threads), exchange(threads), fragments(threads * 6) {
    for (unsigned w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w)
      warp_sync.push_back(std::make_unique<std::barrier<>>(kWarpSize));
  }
};

inline thread_local Dim3 thread_idx, block_idx;
inline Dim3 block_dim, grid_dim;
inline thread_local Block* current_block = nullptr;
inline thread_local long long barrier_interval = 0;  // __syncthreads passed by this thread

// A staging race the GPU could show (compute-sanitizer's racecheck finds
// them there): abort with its description.
inline void staging_race(const char* what, const void* chunk) {
  std::fprintf(stderr, "emulated cp.async race: %s (chunk %p, thread %u)\n", what, chunk,
               thread_idx.x);
  std::abort();
}

// A copy into `chunk` issued by this thread: no other thread may have read
// it since the last barrier (the copy may land at once).
inline void check_copy_issue(const void* chunk) {
  if (current_block == nullptr) return;  // outside a launch (a host test)
  std::lock_guard<std::mutex> hold(current_block->chunk_lock);
  ChunkState& c = current_block->chunks[reinterpret_cast<uintptr_t>(chunk)];
  const int me = static_cast<int>(thread_idx.x);
  if (c.read_interval == barrier_interval && c.reader != me)
    staging_race("a copy into a chunk another thread read since the last barrier", chunk);
  if (c.in_flight) staging_race("a copy into a chunk with a copy in flight", chunk);
  c.in_flight = true;
  c.writer = me;
}

inline void check_copy_landed(const void* chunk) {
  if (current_block == nullptr) return;
  std::lock_guard<std::mutex> hold(current_block->chunk_lock);
  ChunkState& c = current_block->chunks[reinterpret_cast<uintptr_t>(chunk)];
  c.in_flight = false;
  c.landed_interval = barrier_interval;
}

// A read of `chunk` (ldmatrix) by this thread: not while a copy into it is
// in flight, and another thread's copy only after a barrier past its wait.
inline void check_read(const void* chunk) {
  if (current_block == nullptr) return;
  std::lock_guard<std::mutex> hold(current_block->chunk_lock);
  const auto found = current_block->chunks.find(reinterpret_cast<uintptr_t>(chunk));
  if (found == current_block->chunks.end()) return;  // never a cp.async destination
  ChunkState& c = found->second;
  const int me = static_cast<int>(thread_idx.x);
  if (c.in_flight) staging_race("a read of a chunk whose copy is in flight", chunk);
  if (c.writer != me && c.landed_interval == barrier_interval)
    staging_race("a read of another thread's copy without a barrier after its wait", chunk);
  c.reader = c.read_interval == barrier_interval && c.reader != me ? -2 : me;
  c.read_interval = barrier_interval;
}

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

// cp.async (csrc/cuda/mma.cuh): the calling thread's copies not landed
// yet, oldest first, each with the commit group it joined (-1: not
// committed yet).
struct CopyInFlight {
  unsigned char* to;
  unsigned char bytes[16];
  long long group;
};
inline thread_local std::vector<CopyInFlight> copies_in_flight;
inline thread_local long long groups_committed = 0;

// cp.async.cg.shared.global [to], [from], 16, valid ? 16 : 0: the source is
// read now (relkd's kernels never write what they stage), the destination
// written when a wait covers it; 16 zero bytes when !valid.
inline std::atomic<bool> copies_land_early{false};  // set between launches
inline void copy_async_16(void* to, const void* from, bool valid) {
  check_copy_issue(to);
  CopyInFlight copy{static_cast<unsigned char*>(to), {}, -1};
  if (valid) std::memcpy(copy.bytes, from, sizeof(copy.bytes));
  if (copies_land_early.load()) std::memcpy(copy.to, copy.bytes, sizeof(copy.bytes));
  copies_in_flight.push_back(copy);  // in flight until its wait all the same
}
inline void commit_copies() {
  for (CopyInFlight& copy : copies_in_flight)
    if (copy.group < 0) copy.group = groups_committed;
  ++groups_committed;
}
// cp.async.wait_group pending: lands every copy of the groups committed
// before the last `pending` ones.
inline void wait_copies(int pending) {
  std::vector<CopyInFlight> still;
  for (const CopyInFlight& copy : copies_in_flight) {
    if (copy.group >= 0 && copy.group < groups_committed - pending) {
      if (!copies_land_early.load()) std::memcpy(copy.to, copy.bytes, sizeof(copy.bytes));
      check_copy_landed(copy.to);
    } else {
      still.push_back(copy);
    }
  }
  copies_in_flight.swap(still);
}
inline void check_no_copies_in_flight() {
  if (copies_in_flight.empty()) return;
  std::fprintf(stderr, "emulated cp.async: a thread ended with %zu copies not waited for\n",
               copies_in_flight.size());
  std::abort();
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
          check_no_copies_in_flight();
        });
      for (auto& w : workers) w.join();
    }
  }
};

template <typename... Params>
Launcher<Params...> launch(long long grid, long long threads, void (*kernel)(Params...)) {
  return {grid, threads, kernel};
}

// Dynamic shared memory: one buffer, as blocks run one at a time (its
// contents are not cleared between blocks, as on the GPU).
inline std::vector<double> dynamic_shared_memory;  // doubles: aligned for any type

template <typename... Params>
Launcher<Params...> launch_shared(long long grid, long long threads, size_t bytes,
                                  void (*kernel)(Params...)) {
  dynamic_shared_memory.assign((bytes + sizeof(double) - 1) / sizeof(double), 0.0);
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

inline void __syncthreads() {
  relkd_emulation::current_block->block_sync.arrive_and_wait();
  ++relkd_emulation::barrier_interval;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> at(*address);
  T seen = at.load();
  while (value < seen && !at.compare_exchange_weak(seen, value)) {
  }
  return seen;
}

// Every lane of the warp must call the warp operations together (as on the
// GPU with a full mask).
namespace relkd_emulation {
// Each lane posts `value` and reads lane `source`'s (its own when source
// lies outside the warp).
template <typename T>
T warp_exchange(T value, int source) {
  uint64_t* slots = warp_slots();
  slots[lane()] = to_bits(value);
  warp_barrier().arrive_and_wait();
  const T out = source >= 0 && source < kWarpSize ? from_bits<T>(slots[source]) : value;
  warp_barrier().arrive_and_wait();
  return out;
}
}  // namespace relkd_emulation

template <typename T>
T __shfl_down_sync(unsigned, T value, int offset) {
  return relkd_emulation::warp_exchange(value, relkd_emulation::lane() + offset);
}

template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {  // lanes below delta keep their own
  return relkd_emulation::warp_exchange(value, relkd_emulation::lane() - static_cast<int>(delta));
}

template <typename T>
T __shfl_sync(unsigned, T value, int source) {
  return relkd_emulation::warp_exchange(value, source % relkd_emulation::kWarpSize);
}

inline unsigned __ballot_sync(unsigned, bool predicate) {
  using namespace relkd_emulation;
  uint64_t* slots = warp_slots();
  slots[lane()] = predicate ? 1 : 0;
  warp_barrier().arrive_and_wait();
  unsigned bits = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if (slots[l]) bits |= 1u << l;
  warp_barrier().arrive_and_wait();
  return bits;
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

namespace relkd_emulation {

inline float from_bf16(uint32_t bits) { return from_bits<float>(uint64_t(bits & 0xffffu) << 16); }

// The value of a float16's 16 bits, decoded field by field (not by the
// conversion under test in mma.cuh).
inline float from_fp16(uint32_t bits) {
  const int exponent = int(bits >> 10 & 0x1fu), fraction = int(bits & 0x3ffu);
  const float sign = (bits & 0x8000u) ? -1.0f : 1.0f;
  if (exponent == 31) return fraction ? std::nanf("") : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(float(fraction), -24);  // subnormal
  return sign * std::ldexp(float(1024 + fraction), exponent - 25);
}

enum class MmaFormat { Bf16, Fp16, Tf32 };

// One warp-wide mma step over 16 staging units of k (csrc/cuda/mma.cuh):
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 for the
// 16-bit formats, mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 for
// TF32. Every lane of the warp calls it together. Each lane posts its
// fragments; then each computes its four entries of D from the entries of A
// and B, found by the PTX ISA's fragment tables (for lane l: g = l / 4,
// t = l % 4):
//   16-bit (register r holds two entries, the lower index in the lower half):
//     A (16x16, row-major): r0 = A[g][2t..2t+1], r1 = A[g+8][2t..2t+1],
//                           r2 = A[g][2t+8..2t+9], r3 = A[g+8][2t+8..2t+9]
//     B (16x8, column-major): r0 = B[2t..2t+1][g], r1 = B[2t+8..2t+9][g]
//   TF32 (one entry per register; the hardware reads its 19 high bits):
//     A (16x8): r0 = A[g][t], r1 = A[g+8][t], r2 = A[g][t+4], r3 = A[g+8][t+4]
//     B (8x8): r0 = B[t][g], r1 = B[t+4][g]
//   D (16x8, fp32): d[i] = D[g + 8 (i / 2)][2t + i % 2]
// Products of two bf16, fp16 or TF32 values are exact in fp32; the sum runs
// in k order.
inline void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                     MmaFormat format) {
  constexpr int kRegs = 6;  // four of A, two of B
  const unsigned warp_first = thread_idx.x / kWarpSize * kWarpSize;
  uint32_t* slots = current_block->fragments.data() + warp_first * kRegs;
  const int me = lane();
  for (int r = 0; r < 4; ++r) slots[me * kRegs + r] = a[r];
  for (int r = 0; r < 2; ++r) slots[me * kRegs + 4 + r] = b[r];
  warp_barrier().arrive_and_wait();
  const bool tf32 = format == MmaFormat::Tf32;
  auto entry = [&](int owner, int reg, int k) {
    const uint32_t word = slots[owner * kRegs + reg];
    if (tf32) return from_bits<float>(word & 0xffffe000u);
    const uint32_t bits = word >> (16 * (k % 2));
    return format == MmaFormat::Fp16 ? from_fp16(bits & 0xffffu) : from_bf16(bits);
  };
  auto a_at = [&](int row, int k) {
    if (tf32) return entry((row % 8) * 4 + k % 4, row / 8 + 2 * (k / 4), k);
    return entry((row % 8) * 4 + (k % 8) / 2, row / 8 + 2 * (k / 8), k);
  };
  auto b_at = [&](int k, int col) {
    if (tf32) return entry(col * 4 + k % 4, 4 + k / 4, k);
    return entry(col * 4 + (k % 8) / 2, 4 + k / 8, k);
  };
  const int depth = tf32 ? 8 : 16;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = me / 4 + 8 * (i / 2), col = 2 * (me % 4) + i % 2;
    float sum = d[i];
    for (int k = 0; k < depth; ++k) sum += a_at(row, k) * b_at(k, col);
    out[i] = sum;
  }
  warp_barrier().arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 {r0, r1, r2, r3}, [row]: every
// lane of the warp calls it together, lanes 8m .. 8m + 7 giving the
// addresses of rows 0 .. 7 of matrix m (8 consecutive 16-bit entries each,
// 16-byte aligned); lane l receives in r[m] entries 2 (l % 4) and
// 2 (l % 4) + 1 of row l / 4 of matrix m (the lower index in the lower
// half). A misaligned row address faults on the GPU: here it aborts.
// ldmatrix .x4 (trans = false) and ldmatrix .x4.trans (trans = true, each
// 8x8 matrix delivered transposed: lane l receives entries l / 4 of rows
// 2 (l % 4) and 2 (l % 4) + 1).
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool trans = false) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(row);
  if (address % 16 != 0) {
    std::fprintf(stderr, "emulated ldmatrix: row address %p is not 16-byte aligned\n",
                 static_cast<const void*>(row));
    std::abort();
  }
  check_read(row);
  uint64_t* slots = warp_slots();
  const int me = lane();
  slots[me] = address;
  warp_barrier().arrive_and_wait();
  uint32_t out[4];
  auto at = [&](int m, int r, int c) {  // entry (r, c) of matrix m
    return uint32_t(reinterpret_cast<const uint16_t*>(slots[8 * m + r])[c]);
  };
  for (int m = 0; m < 4; ++m) {
    const int g = me / 4, t = me % 4;
    out[m] = trans ? at(m, 2 * t, g) | (at(m, 2 * t + 1, g) << 16)
                   : at(m, g, 2 * t) | (at(m, g, 2 * t + 1) << 16);
  }
  warp_barrier().arrive_and_wait();
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}

}  // namespace relkd_emulation

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
