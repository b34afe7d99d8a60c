// pairwise_loss on CPU: sum of a pair loss over all (masked) pairs of rows and
// columns, and its gradient, tile by tile; no N x N buffer, and one copy of
// each gradient whatever the thread count (each block's tiles run one at a
// time in wave order: csrc/tile_plan.h, parallel_in_block_order in common.h).
//
// The output is a scalar, so the gradient of the sum with respect to every
// input is accumulated in the same pass over the tiles that computes the sum:
// each tile's relation GEMMs are used once, for the value and for the
// derivative tile, and the derivative tile is applied with two small GEMMs.
// The autograd backward (relkd/ops.py) only scales these by grad_output. A
// backward that recomputed the tiles would repeat the relation GEMMs.
#include <string>
#include <vector>

#include "pair_kinds.h"

namespace relkd {
namespace {

struct PairInputs {
  at::Tensor xs_r, xt_r, xs_c, xt_c;  // xs_c, xt_c alias the rows when symmetric
  PairIndex ix;
  int64_t n_r, n_c;
};

// One copy of every gradient, written by one tile of a block at a time
// (parallel_in_block_order); columns alias rows when symmetric.
template <typename T>
struct Grads {
  at::Tensor s_r, s_c, t_r, t_c;  // (rows or columns) x dim, or undefined
  std::vector<T> dn_r, dn_c_own;  // d/d(squared norm) of rows and (rectangular) columns
  std::vector<T>& dn_c(bool sym) { return sym ? dn_r : dn_c_own; }
};

// Per-tile scalar sums, reduced in tile order at the end.
struct TileSums {
  double loss = 0, dmu_s = 0, dmu_t = 0;
};

// Row passes over up to four matrices in one parallel region, kNormRows rows
// per work item: body(m, begin, end) for rows [begin, end) of matrix m
// (undefined matrices are skipped). One region instead of the three or more
// per matrix that the same tensor expression opens.
constexpr int64_t kNormRows = 256;

template <typename F>
void rows_of_each(const std::vector<at::Tensor>& mats, const F& body) {
  std::vector<int64_t> first_item(mats.size() + 1, 0);
  for (size_t m = 0; m < mats.size(); ++m) {
    const int64_t rows = mats[m].defined() ? mats[m].size(0) : 0;
    first_item[m + 1] = first_item[m] + ceil_div(rows, kNormRows);
  }
  const int64_t items = first_item.back();
  parallel_items(items, worker_slots(items), [&](int64_t, int64_t item) {
    size_t m = 0;
    while (item >= first_item[m + 1]) ++m;
    const int64_t begin = (item - first_item[m]) * kNormRows;
    body(m, begin, std::min(mats[m].size(0), begin + kNormRows));
  });
}

// |x_i|^2 of every row (accumulated in double) of each matrix; undefined
// matrices give undefined norms.
template <typename T>
std::vector<at::Tensor> squared_norms(const std::vector<at::Tensor>& mats) {
  std::vector<at::Tensor> out(mats.size());
  for (size_t m = 0; m < mats.size(); ++m)
    if (mats[m].defined()) out[m] = at::empty({mats[m].size(0)}, mats[m].options());
  rows_of_each(mats, [&](size_t m, int64_t begin, int64_t end) {
    const int64_t d = mats[m].size(1);
    const T* x = mats[m].data_ptr<T>();
    T* o = out[m].data_ptr<T>();
    for (int64_t i = begin; i < end; ++i) o[i] = T(lane_dot<double>(x + i * d, x + i * d, d));
  });
  return out;
}

// Pair terms of one tile: fills gs / gt (the derivative tiles), the norms'
// derivatives and the tile's scalar sums.
template <typename T, typename Kind>
TileSums tile_terms(const Kind& kind, const Tile& t, const T* w, const T* s, const T* tt,
                    const T* ns_r, const T* ns_c, const T* nt_r, const T* nt_c, T* gs, T* gt,
                    T* dn_r, T* dn_c) {
  TileSums sums;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t p = t.r0 + r;
    double row_loss = 0;
    T row_dn = 0;
    for (int64_t c = 0; c < t.cols; ++c) {
      const int64_t e = r * t.cols + c, q = t.c0 + c;
      if (gs) gs[e] = T(0);
      if (gt) gt[e] = T(0);
      if (w[e] == T(0)) continue;  // masked: exactly no contribution
      const PairArgs<T> a{w[e], s[e], Kind::has_teacher ? tt[e] : T(0),
                          Kind::uses_norms ? ns_r[p] : T(0), Kind::uses_norms ? ns_c[q] : T(0),
                          nt_r ? nt_r[p] : T(0), nt_c ? nt_c[q] : T(0)};
      const pm::PairTerms<T> terms = kind.pair(a);
      row_loss += double(terms.loss);
      if (gs) {
        gs[e] = terms.ds;
        row_dn += terms.dn_i;
        if (dn_c) dn_c[q] += terms.dn_j;
        sums.dmu_s += double(terms.dmu_s);
        sums.dmu_t += double(terms.dmu_t);
      }
      if (gt) gt[e] = terms.dt;
    }
    sums.loss += row_loss;
    if (gs && dn_r) dn_r[p] += row_dn;
  }
  return sums;
}

template <typename T, typename Kind>
std::vector<at::Tensor> run_pairwise(const Kind& kind, const PairInputs& in, int64_t n_params,
                                     bool grad_s, bool grad_t) {
  const bool sym = in.ix.symmetric;
  const auto tiles = pair_tiles(Kind::mask, in.ix, in.n_r, in.n_c);
  const int64_t blocks_r = ceil_div(in.n_r, kPairTile), blocks_c = ceil_div(in.n_c, kPairTile);
  const auto waves = group_by_wave(tiles, sym, blocks_r, blocks_c);
  const auto opts = in.xs_r.options();

  at::Tensor ns_r, ns_c, nt_r, nt_c;
  if (Kind::uses_norms) {
    const at::Tensor none;
    const auto norms = squared_norms<T>({in.xs_r, sym ? none : in.xs_c,
                                         Kind::has_teacher ? in.xt_r : none,
                                         Kind::has_teacher && !sym ? in.xt_c : none});
    ns_r = norms[0];
    ns_c = sym ? ns_r : norms[1];
    nt_r = norms[2];
    nt_c = sym ? nt_r : norms[3];
  }
  Grads<T> g;
  if (grad_s) {
    g.s_r = zeros_here(in.xs_r.sizes(), opts);
    g.s_c = sym ? g.s_r : zeros_here(in.xs_c.sizes(), opts);
    if (Kind::uses_norms) {
      g.dn_r.assign(in.n_r, T(0));
      if (!sym) g.dn_c_own.assign(in.n_c, T(0));
    }
  }
  if (grad_t) {
    g.t_r = zeros_here(in.xt_r.sizes(), opts);
    g.t_c = sym ? g.t_r : zeros_here(in.xt_c.sizes(), opts);
  }
  std::vector<TileSums> tile_sums(tiles.size());
  int64_t largest_wave = 1;
  for (const auto& wave : waves) largest_wave = std::max<int64_t>(largest_wave, wave.size());
  const int64_t slots = worker_slots(largest_wave);
  WorkerScratch scratch(slots, 5, opts);

  const auto order = order_by_block(tiles, waves, sym, blocks_r, blocks_c);
  parallel_in_block_order(order, sym ? blocks_r : blocks_r + blocks_c, slots,
                          [&](int64_t slot, int64_t ti) {
    const Tile& t = tiles[ti];
    const TileScratch& sc = scratch.get(slot, t);
    if (!prepare_tile<T>(Kind::mask, in.ix, t, in.xs_r, in.xs_c, sc)) return;
    const at::Tensor w = sc[0], s = sc[1], tt = sc[2], gs = sc[3], gt = sc[4];
    const auto xs_r = in.xs_r.narrow(0, t.r0, t.rows), xs_c = in.xs_c.narrow(0, t.c0, t.cols);
    at::Tensor xt_r, xt_c;
    if (Kind::has_teacher) {
      xt_r = in.xt_r.narrow(0, t.r0, t.rows);
      xt_c = in.xt_c.narrow(0, t.c0, t.cols);
      at::Tensor tt_out = tt;
      tile_dot(tt_out, xt_r, xt_c);
    }
    const bool norms = Kind::uses_norms && grad_s;
    tile_sums[ti] = tile_terms<T>(
        kind, t, w.data_ptr<T>(), s.data_ptr<T>(), Kind::has_teacher ? tt.data_ptr<T>() : nullptr,
        data_or_null_t<T>(ns_r), data_or_null_t<T>(ns_c), data_or_null_t<T>(nt_r),
        data_or_null_t<T>(nt_c), grad_s ? gs.data_ptr<T>() : nullptr,
        grad_t ? gt.data_ptr<T>() : nullptr, norms ? g.dn_r.data() : nullptr,
        norms ? g.dn_c(sym).data() : nullptr);
    // The derivative tile times the opposite embeddings, into this tile's
    // blocks (no other tile writes them until it is done).
    if (grad_s) {
      g.s_r.narrow(0, t.r0, t.rows).addmm_(gs, xs_c);
      g.s_c.narrow(0, t.c0, t.cols).addmm_(gs.t(), xs_r);
    }
    if (grad_t) {
      g.t_r.narrow(0, t.r0, t.rows).addmm_(gt, xt_c);
      g.t_c.narrow(0, t.c0, t.cols).addmm_(gt.t(), xt_r);
    }
  });

  TileSums total;
  for (const TileSums& ts : tile_sums) {
    total.loss += ts.loss;
    total.dmu_s += ts.dmu_s;
    total.dmu_t += ts.dmu_t;
  }
  // The squared norm n_i = |x_i|^2 has gradient 2 x_i.
  if (grad_s && Kind::uses_norms) {
    const std::vector<at::Tensor> xs = {in.xs_r, sym ? at::Tensor() : in.xs_c};
    const std::vector<T>* dn[2] = {&g.dn_r, &g.dn_c_own};
    T* grad[2] = {g.s_r.template data_ptr<T>(), sym ? nullptr : g.s_c.template data_ptr<T>()};
    rows_of_each(xs, [&](size_t m, int64_t begin, int64_t end) {
      const int64_t d = xs[m].size(1);
      const T* x = xs[m].data_ptr<T>();
      for (int64_t i = begin; i < end; ++i) {
        const T scale = 2 * (*dn[m])[i];
        for (int64_t e = 0; e < d; ++e) grad[m][i * d + e] += scale * x[i * d + e];
      }
    });
  }

  // Placeholders for gradients not computed: distinct tensors (outputs must not alias).
  auto empty = [&] { return at::empty({0}, opts); };
  at::Tensor grad_params = empty();
  if (grad_s && Kind::params_grad) {
    grad_params = at::zeros({n_params}, opts);
    if (n_params > 0) grad_params[0].fill_(total.dmu_s);
    if (n_params > 1) grad_params[1].fill_(total.dmu_t);
  }
  return {at::scalar_tensor(total.loss, opts),
          grad_s ? g.s_r : empty(),
          grad_s && !sym ? g.s_c : empty(),
          grad_t ? g.t_r : empty(),
          grad_t && !sym ? g.t_c : empty(),
          grad_params};
}

// ------------------------------------------------------------ entry point
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Calls body(kind) with the kind named by `name`, built from params (checked
// by kind_info).
template <typename T, typename F>
void with_kind(c10::string_view name, const at::Tensor& params, F&& body) {
  const T* p = params.data_ptr<T>();
  const int64_t n = params.numel();
  if (name == "cckd") {
    body(CckdKind<T>{p, n});
  } else if (name == "ekd_pos") {
    body(EkdPosKind<T>{p[0], p + 1, p + 1 + (n - 1) / 2, (n - 1) / 2});
  } else if (name == "rkd_dist_sum") {
    body(RkdDistSumKind<T>{});
  } else {
    body(RkdDistanceKind<T>{p[0], p[1]});
  }
}

Outputs pairwise_loss_cpu(c10::string_view kind_name, const at::Tensor& xs_r,
                          const c10::optional<at::Tensor>& xt_r,
                          const c10::optional<at::Tensor>& xs_c,
                          const c10::optional<at::Tensor>& xt_c,
                          const c10::optional<at::Tensor>& labels_r,
                          const c10::optional<at::Tensor>& labels_c,
                          const c10::optional<at::Tensor>& ids_r,
                          const c10::optional<at::Tensor>& ids_c, const at::Tensor& params,
                          bool grad_student, bool grad_teacher) {
  BelowAutograd below_autograd;
  const PairwiseArgs args = check_pairwise_args(kind_name, xs_r, xt_r, xs_c, xt_c, labels_r,
                                                labels_c, ids_r, ids_c, params, grad_teacher);
  PairInputs in;
  in.xs_r = args.xs_r;
  in.xs_c = args.xs_c;
  in.xt_r = args.xt_r;
  in.xt_c = args.xt_c;
  in.n_r = args.n_r;
  in.n_c = args.n_c;
  in.ix = PairIndex{data_or_null(args.ids_r), data_or_null(args.ids_c),
                    data_or_null(args.labels_r), data_or_null(args.labels_c), args.symmetric};

  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(xs_r.scalar_type(), "pairwise_loss", [&] {
    with_kind<scalar_t>(kind_name, args.params, [&](const auto& kind) {
      out = run_pairwise<scalar_t>(kind, in, args.params.numel(), grad_student, grad_teacher);
    });
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) { m.impl("pairwise_loss", &pairwise_loss_cpu); }

}  // namespace relkd
