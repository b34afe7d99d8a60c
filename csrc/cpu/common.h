// Shared helpers of the CPU kernels: work scheduling over threads, the float
// ordering used by mining and selection, and the tile GEMM. Argument checks
// are in csrc/op_checks.h (shared with the CUDA glue).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>

#include "../op_checks.h"
#include "../tile_plan.h"

namespace relkd {

// at::parallel_for whose body also runs below autograd on the worker
// threads: dispatch and grad-mode state are thread-local and do not follow
// the work into OpenMP threads.
template <typename F>
void parallel_below_autograd(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    BelowAutograd below_autograd;
    at::NoGradGuard no_grad;
    body(b, e);
  });
}

// Work items handed out one at a time to at most get_num_threads() workers:
// a worker on a busy core simply takes fewer items, where a static split
// would make every other thread wait for it. body(slot, item) runs once per
// item; slot in [0, slots) names the worker, for worker-private scratch.
// Results must not depend on which worker runs an item (callers reduce
// per-item results in item order, or only integers).
inline int64_t worker_slots(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
}

template <typename F>
void parallel_items(int64_t items, int64_t slots, const F& body) {
  std::atomic<int64_t> next{0};
  parallel_below_autograd(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot)
      for (int64_t item; (item = next.fetch_add(1, std::memory_order_relaxed)) < items;)
        body(slot, item);
  });
}

// body(begin, end) over [0, n) in chunks of `chunk`, handed out one at a time
// (parallel_items): for loops whose iterations are independent.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& body) {
  const int64_t items = ceil_div(n, chunk);
  parallel_items(items, worker_slots(items), [&](int64_t, int64_t item) {
    body(item * chunk, std::min(n, (item + 1) * chunk));
  });
}

// Runs body(slot, tile) for the tiles of `order` (csrc/tile_plan.h's
// order_by_block) on at most `slots` workers. A worker takes the first tile
// whose blocks have finished all their earlier tiles, so every block is
// updated by one tile at a time, in a fixed order: results are bitwise the
// same for any thread count and scheduling. No barrier between waves: a
// worker descheduled by a busy core only holds back the tiles that share
// its blocks, and the others keep going. Waiting workers yield their core.
template <typename F>
void parallel_in_block_order(const std::vector<OrderedTile>& order, int64_t blocks,
                             int64_t slots, const F& body) {
  const int64_t n = order.size();
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[blocks]);
  std::unique_ptr<std::atomic<bool>[]> claimed(new std::atomic<bool>[n]);
  for (int64_t b = 0; b < blocks; ++b) done[b].store(0, std::memory_order_relaxed);
  for (int64_t i = 0; i < n; ++i) claimed[i].store(false, std::memory_order_relaxed);
  std::atomic<int64_t> first_open{0};  // every tile before it is claimed

  auto ready = [&](const OrderedTile& o) {
    for (int j = 0; j < 2; ++j)
      if (o.block[j] >= 0 && done[o.block[j]].load(std::memory_order_acquire) != o.turn[j])
        return false;
    return true;
  };
  auto claim = [&]() -> int64_t {  // -1: nothing to claim yet; n: all claimed
    int64_t lo = first_open.load(std::memory_order_relaxed);
    while (lo < n && claimed[lo].load(std::memory_order_relaxed)) ++lo;
    int64_t seen = first_open.load(std::memory_order_relaxed);
    while (seen < lo && !first_open.compare_exchange_weak(seen, lo)) {
    }
    if (lo == n) return n;
    for (int64_t i = lo; i < n; ++i)
      if (!claimed[i].load(std::memory_order_relaxed) && ready(order[i]) &&
          !claimed[i].exchange(true, std::memory_order_acq_rel))
        return i;
    return -1;
  };
  parallel_below_autograd(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot)
      for (;;) {
        const int64_t i = claim();
        if (i == n) break;
        if (i < 0) {
          std::this_thread::yield();
          continue;
        }
        body(slot, order[i].tile);
        for (int j = 0; j < 2; ++j)
          if (order[i].block[j] >= 0)
            done[order[i].block[j]].fetch_add(1, std::memory_order_release);
      }
  });
}

// A zero tensor filled on the calling thread. Outside a parallel region
// at::zeros of 32768 or more elements opens one of its own, and after every
// region libgomp's idle worker spins for milliseconds: beside a busy process
// that costs more than the memset.
inline at::Tensor zeros_here(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  if (t.numel() > 0) std::memset(t.data_ptr(), 0, t.nbytes());
  return t;
}

// ---------------------------------------------------------------- ordering
using pm::KeyOf;
using pm::order_key;
using pm::ranks_below;

// ---------------------------------------------------------------- dot products
// sum_e x[e] * y[e] accumulated in Acc over sixteen independent partial sums,
// folded pairwise: the compiler turns the inner loop into vector FMAs, where
// one running sum is a serial dependency chain (no -ffast-math
// reassociation). The order is fixed, so every call gives the same bits.
template <typename Acc, typename T>
inline Acc lane_dot(const T* x, const T* y, int64_t d) {
  constexpr int kLanes = 16;
  Acc lane[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += Acc(x[e + l]) * Acc(y[e + l]);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  Acc tail = 0;
  for (; e < d; ++e) tail += Acc(x[e]) * Acc(y[e]);
  return lane[0] + tail;
}

// ---------------------------------------------------------------- tiles
// out[rows x cols] = a_blk @ b_blk^T with ATen's GEMM (MKL/oneDNN). Called
// inside at::parallel_for the GEMM runs single-threaded on the calling
// thread, so a thread computes a tile and consumes it while it is hot in
// its cache; no N x M buffer ever exists.
inline void tile_dot(at::Tensor& out, const at::Tensor& a_blk, const at::Tensor& b_blk) {
  at::mm_out(out, a_blk, b_blk.t());
}


}  // namespace relkd
