// Shared helpers of the CPU kernels: argument checks, the float ordering used
// by mining and selection, and the tile GEMM.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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
// Mining order (SPEC §2, §9): larger value first, NaN below every number,
// ties to the smaller index. -0.0 and +0.0 are equal, as in torch.sort.
template <typename T>
inline bool ranks_below(T v1, int64_t j1, T v2, int64_t j2) {
  const bool n1 = std::isnan(v1), n2 = std::isnan(v2);
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 < v2;
  return j1 > j2;
}

// Unsigned key whose integer order is the value order: NaN -> 0 (below
// -inf), -0.0 -> +0.0. Radix selection works on these keys.
template <typename T> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename T>
inline typename KeyOf<T>::type order_key(T v) {
  using K = typename KeyOf<T>::type;
  constexpr K sign = K(1) << (sizeof(K) * 8 - 1);
  if (std::isnan(v)) return 0;
  if (v == T(0)) v = T(0);
  K bits;
  std::memcpy(&bits, &v, sizeof(K));
  return (bits & sign) ? ~bits : (bits | sign);
}

template <typename T>
inline T key_value(typename KeyOf<T>::type key) {
  using K = typename KeyOf<T>::type;
  constexpr K sign = K(1) << (sizeof(K) * 8 - 1);
  if (key == 0) return std::numeric_limits<T>::quiet_NaN();
  K bits = (key & sign) ? (key & ~sign) : ~key;
  T v;
  std::memcpy(&v, &bits, sizeof(K));
  return v;
}

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
