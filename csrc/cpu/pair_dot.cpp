// pair_dot on CPU: out[i, s] = a_i . b_{idx[i, s]} without the N x k x D
// gather that `(a[:, None] * b[idx]).sum(-1)` materialises.
//
// Backward: grad_a by rows; grad_b by an inverse index (CSR over columns) so
// every b row sums its contributions in a fixed order: bitwise identical for
// any thread count, unlike a scatter-add with atomics.
#include <algorithm>
#include <vector>

#include "common.h"

namespace relkd {
namespace {

constexpr int64_t kRows = 64;  // rows per work item, forward and backward

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] += alpha * x[e];
}

at::Tensor pair_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& idx_in) {
  BelowAutograd below_autograd;
  check_pair_dot_args(a_in, b_in, idx_in);
  const auto a = a_in.contiguous(), b = b_in.contiguous(), idx = idx_in.contiguous();
  const int64_t n = a.size(0), k = idx.size(1), d = a.size(1);
  auto out = at::empty({n, k}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_dot", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pi = idx.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    parallel_chunks(n, kRows, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t s = 0; s < k; ++s) {
          const int64_t j = pi[i * k + s];
          po[i * k + s] = j < 0 ? scalar_t(0) : lane_dot<scalar_t>(pa + i * d, pb + j * d, d);
        }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_dot_backward_cpu(const at::Tensor& grad_in,
                                                         const at::Tensor& a_in,
                                                         const at::Tensor& b_in,
                                                         const at::Tensor& idx_in, bool need_a,
                                                         bool need_b) {
  BelowAutograd below_autograd;
  check_pair_dot_args(a_in, b_in, idx_in);
  check_pair_dot_grad(grad_in, a_in, idx_in);
  const auto grad = grad_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t n = a.size(0), m = b.size(0), k = idx.size(1), d = a.size(1);
  // A gradient that is not needed is returned as an empty tensor. Each
  // gradient row is zeroed by the worker that sums into it (no separate
  // parallel fill).
  at::Tensor grad_a = at::empty(need_a ? a.sizes() : at::IntArrayRef{0}, a.options());
  at::Tensor grad_b = at::empty(need_b ? b.sizes() : at::IntArrayRef{0}, b.options());

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_dot_backward", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pi = idx.data_ptr<int64_t>();
    // Inverse index: for every column j, the flat entries e = i * k + s
    // with idx[e] == j, in increasing e.
    std::vector<int64_t> start, entries;
    if (need_b) {
      start.assign(static_cast<size_t>(m + 1), 0);
      for (int64_t e = 0; e < n * k; ++e)
        if (pi[e] >= 0) ++start[pi[e] + 1];
      for (int64_t j = 0; j < m; ++j) start[j + 1] += start[j];
      entries.resize(static_cast<size_t>(start[m]));
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t e = 0; e < n * k; ++e)
        if (pi[e] >= 0) entries[fill[pi[e]]++] = e;
    }
    scalar_t* ga = need_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = need_b ? grad_b.data_ptr<scalar_t>() : nullptr;
    auto grad_a_rows = [&](int64_t begin, int64_t end) {
      std::fill(ga + begin * d, ga + end * d, scalar_t(0));
      for (int64_t i = begin; i < end; ++i)
        for (int64_t s = 0; s < k; ++s) {
          const int64_t j = pi[i * k + s];
          if (j >= 0) axpy(pg[i * k + s], pb + j * d, ga + i * d, d);
        }
    };
    auto grad_b_rows = [&](int64_t begin, int64_t end) {
      std::fill(gb + begin * d, gb + end * d, scalar_t(0));
      for (int64_t j = begin; j < end; ++j)
        for (int64_t p = start[j]; p < start[j + 1]; ++p) {
          const int64_t e = entries[p];
          axpy(pg[e], pa + (e / k) * d, gb + j * d, d);
        }
    };
    // Both gradients' row chunks in one parallel region: every region's
    // start and join waits for all its threads, which costs most on a busy
    // machine.
    const int64_t items_a = need_a ? ceil_div(n, kRows) : 0;
    const int64_t items_b = need_b ? ceil_div(m, kRows) : 0;
    parallel_items(items_a + items_b, worker_slots(items_a + items_b),
                   [&](int64_t, int64_t item) {
                     if (item < items_a)
                       grad_a_rows(item * kRows, std::min(n, (item + 1) * kRows));
                     else
                       grad_b_rows((item - items_a) * kRows,
                                   std::min(m, (item - items_a + 1) * kRows));
                   });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("pair_dot", &pair_dot_cpu);
  m.impl("pair_dot_backward", &pair_dot_backward_cpu);
}

}  // namespace relkd
