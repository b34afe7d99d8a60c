// Shared helpers of the CPU kernels: argument checks, the float ordering used
// by mining and selection, and the tile GEMM.
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

#include "../pair_math.h"

namespace relkd {

// Kernels run below autograd: the ATen calls they make on their (possibly
// requires_grad) inputs must not record graph nodes. Every entry point opens
// one of these.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

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

// ---------------------------------------------------------------- checks
// The Python layer validates user input with messages that name the
// argument; these guard the ops when called directly (opcheck, users of
// torch.ops.relkd) so that bad input can never read out of bounds.
inline void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (rows x dim), got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                    name, " must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), na, " and ", nb,
                    " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), na, " and ", nb, " must be on the same device");
}

inline void check_index_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n,
                    ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
}

// Contiguous int64 copy of an optional index vector (labels, ids), or an
// undefined tensor.
inline at::Tensor contiguous_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline const int64_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace relkd
