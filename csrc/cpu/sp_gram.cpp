// SP's Gram identity on the CPU (relkd/fused.py, _SPGramIdentity): the
// D x D Gram matrices of the batch, the per-row quadratic forms, and their
// backward, in float64, each phase one parallel region over row chunks
// taken dynamically. Written with PyTorch ops the same work was about a
// hundred small regions (float64 conversions, MKL GEMMs with a static split,
// elementwise ops), each waiting for every thread: beside one busy process
// it slowed down more than the eager N x N reference did.
//
// A Gram matrix is summed per group of row chunks (the groups depend on the
// row count only), then the groups in order: the same bits for any number of
// threads. Peak extra memory: the groups' partial Grams (at most kGramBytes)
// plus a few chunks per thread.
#include <functional>
#include <vector>

#include "common.h"

namespace relkd {
namespace {

constexpr int64_t kChunkRows = 256;                  // rows converted and multiplied at once
constexpr int64_t kMaxGroups = 16;                   // partial Gram sets, at most
constexpr int64_t kGramBytes = int64_t(64) << 20;    // bound of the partial Grams

struct Grams {
  at::Tensor ss, tt, st;  // sum w x_s^T x_s, sum w x_t^T x_t, sum w x_s^T x_t
};

// Rows [r0, r0 + rows) of x in float64 (a copy; x may be any float dtype).
at::Tensor rows_double(const at::Tensor& x, int64_t r0, int64_t rows) {
  return x.narrow(0, r0, rows).to(at::kDouble).contiguous();
}

// x scaled by w[r0 + i] row by row; x itself when w is undefined.
at::Tensor weighted(const at::Tensor& x, const at::Tensor& w, int64_t r0) {
  return w.defined() ? x * w.narrow(0, r0, x.size(0)).unsqueeze(1) : x;
}

// part[0] += part[1] + ... element by element, in group order (fixed bits),
// all three Grams in one parallel region: a Tensor::add_ per group and Gram
// was one OpenMP region each, and every region leaves the pool's threads
// spinning a few ms, CPU time a busy machine's other processes need.
void add_in_group_order(std::vector<Grams>& part) {
  at::Tensor Grams::*members[3] = {&Grams::ss, &Grams::tt, &Grams::st};
  int64_t ends[3], total = 0;
  for (int m = 0; m < 3; ++m) ends[m] = total += (part[0].*members[m]).numel();
  parallel_chunks(total, 1 << 14, [&](int64_t b, int64_t e) {
    for (int m = 0; m < 3; ++m) {  // the part of [b, e) in Gram m
      const int64_t start = m ? ends[m - 1] : 0, lo = std::max(b, start), hi = std::min(e, ends[m]);
      if (lo >= hi) continue;
      double* dst = (part[0].*members[m]).data_ptr<double>();
      for (size_t g = 1; g < part.size(); ++g) {
        const double* src = (part[g].*members[m]).data_ptr<double>();
        for (int64_t i = lo - start; i < hi - start; ++i) dst[i] += src[i];
      }
    }
  });
}

using ChunkWork = std::function<void(int64_t r0, const at::Tensor& xs, const at::Tensor& xt)>;

// The three Gram matrices of the rows of (x_s, x_t), row i weighted by
// w_ss[i], w_tt[i], w_st[i] (undefined: 1), while `work` (if set) is called
// on every chunk of rows in float64.
Grams grams(const at::Tensor& x_s, const at::Tensor& x_t, const at::Tensor& w_ss,
            const at::Tensor& w_tt, const at::Tensor& w_st, const ChunkWork& work) {
  const int64_t n = x_s.size(0), ds = x_s.size(1), dt = x_t.size(1);
  const auto opts = x_s.options().dtype(at::kDouble);
  const int64_t group_bytes = 8 * (ds * ds + dt * dt + ds * dt);
  const int64_t chunks = ceil_div(n, kChunkRows);
  const int64_t groups = std::max<int64_t>(
      1, std::min({chunks, kMaxGroups, kGramBytes / std::max<int64_t>(1, group_bytes)}));
  std::vector<Grams> part(groups);
  parallel_items(groups, worker_slots(groups), [&](int64_t, int64_t g) {
    Grams p{at::zeros({ds, ds}, opts), at::zeros({dt, dt}, opts), at::zeros({ds, dt}, opts)};
    for (int64_t c = chunks * g / groups; c < chunks * (g + 1) / groups; ++c) {
      const int64_t r0 = c * kChunkRows, rows = std::min(kChunkRows, n - r0);
      const auto xs = rows_double(x_s, r0, rows), xt = rows_double(x_t, r0, rows);
      p.ss.addmm_(weighted(xs, w_ss, r0).t(), xs);
      p.tt.addmm_(weighted(xt, w_tt, r0).t(), xt);
      p.st.addmm_(weighted(xs, w_st, r0).t(), xt);
      if (work) work(r0, xs, xt);
    }
    part[g] = std::move(p);
  });
  add_in_group_order(part);
  return part[0];
}

void check_sp_args(const at::Tensor& f_s, const at::Tensor& f_t, const at::Tensor& a_s,
                   const at::Tensor& a_t) {
  for (const auto* t : {&f_s, &f_t, &a_s, &a_t}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && at::isFloatingType(t->scalar_type()),
                      "sp_gram: features must be 2-D floating tensors, got ", t->scalar_type(),
                      " ", t->sizes());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "sp_gram: CPU tensors expected, got ",
                      t->device());
  }
  TORCH_CHECK_VALUE(f_s.size(0) == f_t.size(0) && a_s.size(0) == a_t.size(0),
                    "sp_gram: student and teacher rows must match, got ", f_s.size(0), " and ",
                    f_t.size(0), " rows, ", a_s.size(0), " and ", a_t.size(0), " batch rows");
  TORCH_CHECK_VALUE(f_s.size(1) == a_s.size(1) && f_t.size(1) == a_t.size(1),
                    "sp_gram: rows and batch must have the same dims, got ", f_s.size(1), "/",
                    a_s.size(1), " and ", f_t.size(1), "/", a_t.size(1));
}

// Row i's (f_s,i G_ss f_s,i, f_t,i G_tt f_t,i, f_s,i G_st f_t,i).
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_forms(const at::Tensor& f_s,
                                                          const at::Tensor& f_t,
                                                          const Grams& g) {
  const int64_t n = f_s.size(0);
  const auto opts = f_s.options().dtype(at::kDouble);
  at::Tensor r_s = at::empty({n}, opts), r_t = at::empty({n}, opts), c = at::empty({n}, opts);
  parallel_chunks(n, kChunkRows, [&](int64_t b, int64_t e) {
    const auto xs = rows_double(f_s, b, e - b), xt = rows_double(f_t, b, e - b);
    r_s.narrow(0, b, e - b).copy_((at::mm(xs, g.ss) * xs).sum(1));
    r_t.narrow(0, b, e - b).copy_((at::mm(xt, g.tt) * xt).sum(1));
    c.narrow(0, b, e - b).copy_((at::mm(xs, g.st) * xt).sum(1));
  });
  return {r_s, r_t, c};
}

// (gram_ss, gram_tt, gram_st) of the batch a (f when a_s is absent) and the
// row forms of f against them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
sp_gram_forward_cpu(const at::Tensor& f_s, const at::Tensor& f_t,
                    const c10::optional<at::Tensor>& a_s, const c10::optional<at::Tensor>& a_t) {
  BelowAutograd below_autograd;
  TORCH_CHECK_VALUE(a_s.has_value() == a_t.has_value(),
                    "sp_gram_forward: a_s and a_t must be given together");
  const at::Tensor as = a_s.value_or(f_s), at_ = a_t.value_or(f_t);
  check_sp_args(f_s, f_t, as, at_);
  const Grams g = grams(as, at_, {}, {}, {}, nullptr);
  auto [r_s, r_t, c] = row_forms(f_s, f_t, g);
  return {g.ss, g.tt, g.st, r_s, r_t, c};
}

// Gradients of sum_i (w_s,i r_s,i + w_t,i r_t,i + u_i c_i) with the Grams
// as functions of the batch a (f when a_s is absent; then the batch's part
// is added to the rows' and the last two outputs are empty): the rows'
// direct terms, then every batch row through the Grams. Empty tensors for
// the student (teacher) gradients unless need_s (need_t).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sp_gram_backward_cpu(
    const at::Tensor& f_s, const at::Tensor& f_t, const c10::optional<at::Tensor>& a_s,
    const c10::optional<at::Tensor>& a_t, const at::Tensor& gram_ss, const at::Tensor& gram_tt,
    const at::Tensor& gram_st, const at::Tensor& w_s, const at::Tensor& w_t,
    const at::Tensor& u, bool need_s, bool need_t) {
  BelowAutograd below_autograd;
  TORCH_CHECK_VALUE(a_s.has_value() == a_t.has_value(),
                    "sp_gram_backward: a_s and a_t must be given together");
  const bool single = !a_s.has_value();
  const at::Tensor as = a_s.value_or(f_s), at_ = a_t.value_or(f_t);
  check_sp_args(f_s, f_t, as, at_);
  const int64_t n = f_s.size(0);
  for (const auto* w : {&w_s, &w_t, &u})
    TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == n && w->scalar_type() == at::kDouble,
                      "sp_gram_backward: row weights must be float64 of length ", n, ", got ",
                      w->scalar_type(), " ", w->sizes());
  const auto ws = w_s.contiguous(), wt = w_t.contiguous(), wu = u.contiguous();
  const auto gss = gram_ss.to(at::kDouble), gtt = gram_tt.to(at::kDouble),
             gst = gram_st.to(at::kDouble);
  at::Tensor g_fs = need_s ? at::empty_like(f_s) : f_s.new_empty({0});
  at::Tensor g_ft = need_t ? at::empty_like(f_t) : f_t.new_empty({0});

  // Rows of f: their direct terms, and the weighted Grams the batch needs.
  const Grams w = grams(f_s, f_t, ws, wt, wu, [&](int64_t r0, const at::Tensor& xs,
                                                   const at::Tensor& xt) {
    const int64_t rows = xs.size(0);
    if (need_s)
      g_fs.narrow(0, r0, rows)
          .copy_(2 * weighted(at::mm(xs, gss), ws, r0) + weighted(at::mm(xt, gst.t()), wu, r0));
    if (need_t)
      g_ft.narrow(0, r0, rows)
          .copy_(2 * weighted(at::mm(xt, gtt), wt, r0) + weighted(at::mm(xs, gst), wu, r0));
  });

  // Rows of the batch, through the Grams: 2 a_s W_ss + a_t W_st^T, 2 a_t W_tt + a_s W_st.
  at::Tensor g_as = need_s && !single ? at::empty_like(as) : as.new_empty({0});
  at::Tensor g_at = need_t && !single ? at::empty_like(at_) : at_.new_empty({0});
  at::Tensor& out_s = single ? g_fs : g_as;
  at::Tensor& out_t = single ? g_ft : g_at;
  parallel_chunks(as.size(0), kChunkRows, [&](int64_t b, int64_t e) {
    const auto xs = rows_double(as, b, e - b), xt = rows_double(at_, b, e - b);
    if (need_s) {
      auto rows = out_s.narrow(0, b, e - b);
      auto term = 2 * at::mm(xs, w.ss) + at::mm(xt, w.st.t());
      rows.copy_(single ? rows.to(at::kDouble) + term : term);
    }
    if (need_t) {
      auto rows = out_t.narrow(0, b, e - b);
      auto term = 2 * at::mm(xt, w.tt) + at::mm(xs, w.st);
      rows.copy_(single ? rows.to(at::kDouble) + term : term);
    }
  });
  return {g_fs, g_ft, g_as, g_at};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("sp_gram_forward", &sp_gram_forward_cpu);
  m.impl("sp_gram_backward", &sp_gram_backward_cpu);
}

}  // namespace relkd
