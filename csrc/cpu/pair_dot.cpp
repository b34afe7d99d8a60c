// pair_dot on CPU: out[i, s] = a_i . b_{idx[i, s]} without the N x k x D
// gather that `(a[:, None] * b[idx]).sum(-1)` materialises; pair_list_dot:
// out[p] = a_{rows[p]} . b_{cols[p]} for a list of pairs (EKD's hard
// negatives) without the two P x D gathers and their scatter backward.
//
// Backward: a gradient row sums its terms in a fixed order, through an
// inverse index (CSR) where several entries land on one row: bitwise
// identical for any thread count, unlike a scatter-add with atomics.
#include <algorithm>
#include <vector>

#include "common.h"

namespace relkd {
namespace {

constexpr int64_t kRows = 64;  // rows per work item, forward and backward
// Pairs per forward work item: EKD's default 2000 hard pairs are one item,
// computed inline; a parallel region would cost more than their dot products.
constexpr int64_t kPairs = 4096;

template <typename T>
inline void axpy(T alpha, const T* x, T* y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] += alpha * x[e];
}

// For every target row j in [0, m): the entries e in [0, count) with
// key(e) == j, in increasing e (key -1: no row).
struct InverseIndex {
  std::vector<int64_t> start, entries;

  template <typename Key>
  InverseIndex(int64_t count, int64_t m, const Key& key) : start(static_cast<size_t>(m + 1), 0) {
    for (int64_t e = 0; e < count; ++e)
      if (const int64_t j = key(e); j >= 0) ++start[j + 1];
    for (int64_t j = 0; j < m; ++j) start[j + 1] += start[j];
    entries.resize(static_cast<size_t>(start[m]));
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < count; ++e)
      if (const int64_t j = key(e); j >= 0) entries[fill[j]++] = e;
  }

  // Rows [begin, end) of out, zeroed by the worker that sums into them (no
  // separate parallel fill): out_j = sum over j's entries e of weight(e) * src(e).
  template <typename T, typename Weight, typename Source>
  void sum_rows(T* out, int64_t d, int64_t begin, int64_t end, const Weight& weight,
                const Source& src) const {
    std::fill(out + begin * d, out + end * d, T(0));
    for (int64_t j = begin; j < end; ++j)
      for (int64_t p = start[j]; p < start[j + 1]; ++p)
        axpy(weight(entries[p]), src(entries[p]), out + j * d, d);
  }
};

// Rows [0, n) of one gradient and [0, m) of another, kRows at a time, in one
// parallel region: every region's start and join waits for all its threads,
// which costs most on a busy machine. A size of 0 skips that gradient.
template <typename RowsA, typename RowsB>
void two_gradients(int64_t n, int64_t m, const RowsA& rows_a, const RowsB& rows_b) {
  const int64_t items_a = ceil_div(n, kRows), items_b = ceil_div(m, kRows);
  parallel_items(items_a + items_b, worker_slots(items_a + items_b), [&](int64_t, int64_t item) {
    if (item < items_a)
      rows_a(item * kRows, std::min(n, (item + 1) * kRows));
    else
      rows_b((item - items_a) * kRows, std::min(m, (item - items_a + 1) * kRows));
  });
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
    scalar_t* ga = need_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = need_b ? grad_b.data_ptr<scalar_t>() : nullptr;
    // grad_b: for every column j, the flat entries e = i * k + s with idx[e] == j.
    const InverseIndex by_column(need_b ? n * k : 0, need_b ? m : 0,
                                 [&](int64_t e) { return pi[e]; });
    auto grad_a_rows = [&](int64_t begin, int64_t end) {
      std::fill(ga + begin * d, ga + end * d, scalar_t(0));
      for (int64_t i = begin; i < end; ++i)
        for (int64_t s = 0; s < k; ++s) {
          const int64_t j = pi[i * k + s];
          if (j >= 0) axpy(pg[i * k + s], pb + j * d, ga + i * d, d);
        }
    };
    auto grad_b_rows = [&](int64_t begin, int64_t end) {
      by_column.sum_rows(gb, d, begin, end, [&](int64_t e) { return pg[e]; },
                         [&](int64_t e) { return pa + (e / k) * d; });
    };
    two_gradients(need_a ? n : 0, need_b ? m : 0, grad_a_rows, grad_b_rows);
  });
  return {grad_a, grad_b};
}

// ------------------------------------------------------------ pair_list_dot
at::Tensor pair_list_dot_cpu(const at::Tensor& a_in, const c10::optional<at::Tensor>& b_in,
                             const at::Tensor& rows_in, const at::Tensor& cols_in) {
  BelowAutograd below_autograd;
  check_pair_list_args(a_in, b_in, rows_in, cols_in);
  const auto a = a_in.contiguous(), b = b_in.has_value() ? b_in->contiguous() : a;
  const auto rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const int64_t count = rows.size(0), d = a.size(1);
  auto out = at::empty({count}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_list_dot", [&] {
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pr = rows.data_ptr<int64_t>();
    const int64_t* pc = cols.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    parallel_chunks(count, kPairs, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p)
        po[p] = pr[p] < 0 || pc[p] < 0 ? scalar_t(0)
                                       : lane_dot<scalar_t>(pa + pr[p] * d, pb + pc[p] * d, d);
    });
  });
  return out;
}

// With b absent the pairs' both ends are rows of a: grad_a sums the row ends'
// terms (entries e < count) and then the column ends' (count + e), one
// inverse index over both.
std::tuple<at::Tensor, at::Tensor> pair_list_dot_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& a_in, const c10::optional<at::Tensor>& b_in,
    const at::Tensor& rows_in, const at::Tensor& cols_in, bool need_a, bool need_b) {
  BelowAutograd below_autograd;
  check_pair_list_args(a_in, b_in, rows_in, cols_in);
  check_pair_list_grad(grad_in, a_in, rows_in);
  const bool shared = !b_in.has_value();
  need_b = need_b && !shared;
  const auto grad = grad_in.contiguous(), a = a_in.contiguous();
  const auto b = shared ? a : b_in->contiguous();
  const auto rows = rows_in.contiguous(), cols = cols_in.contiguous();
  const int64_t count = rows.size(0), n = a.size(0), m = b.size(0), d = a.size(1);
  at::Tensor grad_a = at::empty(need_a ? a.sizes() : at::IntArrayRef{0}, a.options());
  at::Tensor grad_b = at::empty(need_b ? b.sizes() : at::IntArrayRef{0}, b.options());

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pair_list_dot_backward", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.data_ptr<scalar_t>();
    const int64_t* pr = rows.data_ptr<int64_t>();
    const int64_t* pc = cols.data_ptr<int64_t>();
    auto valid = [&](int64_t p) { return pr[p] >= 0 && pc[p] >= 0; };
    // Entry e: a pair's row end (e < count) or, shared, its column end.
    const InverseIndex by_row(need_a ? (shared ? 2 * count : count) : 0, need_a ? n : 0,
                              [&](int64_t e) {
                                const int64_t p = e % count;
                                return !valid(p) ? -1 : e < count ? pr[p] : pc[p];
                              });
    const InverseIndex by_column(need_b ? count : 0, need_b ? m : 0,
                                 [&](int64_t p) { return valid(p) ? pc[p] : -1; });
    auto weight = [&](int64_t e) { return pg[e % count]; };
    scalar_t* ga = need_a ? grad_a.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = need_b ? grad_b.data_ptr<scalar_t>() : nullptr;
    two_gradients(
        need_a ? n : 0, need_b ? m : 0,
        [&](int64_t begin, int64_t end) {
          by_row.sum_rows(ga, d, begin, end, weight, [&](int64_t e) {
            const int64_t p = e % count;
            return e < count ? pb + pc[p] * d : pa + pr[p] * d;
          });
        },
        [&](int64_t begin, int64_t end) {
          by_column.sum_rows(gb, d, begin, end, weight,
                             [&](int64_t p) { return pa + pr[p] * d; });
        });
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("pair_dot", &pair_dot_cpu);
  m.impl("pair_dot_backward", &pair_dot_backward_cpu);
  m.impl("pair_list_dot", &pair_list_dot_cpu);
  m.impl("pair_list_dot_backward", &pair_list_dot_backward_cpu);
}

}  // namespace relkd
