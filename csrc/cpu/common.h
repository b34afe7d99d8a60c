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
#include <type_traits>

#include "../op_checks.h"

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

// ---------------------------------------------------------------- ordering
using pm::KeyOf;
using pm::order_key;
using pm::ranks_below;

// ---------------------------------------------------------------- tiles
// out[rows x cols] = a_blk @ b_blk^T with ATen's GEMM (MKL/oneDNN). Called
// inside at::parallel_for the GEMM runs single-threaded on the calling
// thread, so a thread computes a tile and consumes it while it is hot in
// its cache; no N x M buffer ever exists.
inline void tile_dot(at::Tensor& out, const at::Tensor& a_blk, const at::Tensor& b_blk) {
  at::mm_out(out, a_blk, b_blk.t());
}


}  // namespace relkd
