// The pairwise_loss tile epilogue, templated on the kind's per-pair terms
// (csrc/pair_math.h); csrc/cuda/pair_tile_<kind>.cu instantiate it, one
// small unit per kind, so that builds compile them in parallel.
#pragma once

#include "common.cuh"

namespace relkd {
namespace cuda {

constexpr int kPairItems = 16;  // tile elements per thread
constexpr int64_t kPairBlockElements = int64_t(kThreads) * kPairItems;

// Per-pair terms of each kind, reading its params from device memory.
template <typename T>
struct CckdTerms {
  const T* coef;
  int64_t n;
  __device__ pm::PairTerms<T> operator()(T w, T s, T t, T, T, T, T) const {
    return pm::cckd_pair(w, s, t, coef, n);
  }
};

template <typename T>
struct EkdPosTerms {
  const T* params;  // [temperature, s_anchor..., t_anchor...]
  int64_t n_anchor;
  __device__ pm::PairTerms<T> operator()(T w, T s, T t, T, T, T, T) const {
    return pm::ekd_pos_pair(w, s, t, params[0], params + 1, params + 1 + n_anchor, n_anchor);
  }
};

template <typename T>
struct RkdDistSumTerms {
  __device__ pm::PairTerms<T> operator()(T w, T s, T, T ns_i, T ns_j, T, T) const {
    return pm::rkd_dist_sum_pair(w, s, ns_i, ns_j);
  }
};

template <typename T>
struct RkdDistanceTerms {
  const T* params;  // [mu_s, mu_t]
  __device__ pm::PairTerms<T> operator()(T w, T s, T t, T ns_i, T ns_j, T nt_i, T nt_j) const {
    return pm::rkd_distance_pair(w, s, t, ns_i, ns_j, nt_i, nt_j, params[0], params[1]);
  }
};

// What one pair adds to a block's sums.
struct PairSums {
  double loss = 0, dmu_s = 0, dmu_t = 0;
  __device__ void add(const PairSums& o) {
    loss += o.loss;
    dmu_s += o.dmu_s;
    dmu_t += o.dmu_t;
  }
};

// The pair at (r, c) of the view, whose similarities are s and t: its terms,
// and its entries of the derivative tiles written (0 where masked out).
template <typename T, typename Terms>
__device__ inline PairSums pair_at(const Terms& terms, const PairTileArgs<T>& a,
                                   const TileView& view, const TileMask& mask, int64_t r,
                                   int64_t c, T s, T t) {
  if (r >= view.rows || c >= view.cols) return {};
  const int64_t at = r * view.ld + c, p = view.r0 + r, q = view.c0 + c;
  const int w = tile_weight(mask, p, q);
  if (w == 0) {  // masked: exactly no contribution
    if (a.grad_s) a.s[at] = T(0);
    if (a.grad_t) a.t[at] = T(0);
    if (a.dn) a.dn[at] = T(0);
    return {};
  }
  const pm::PairTerms<T> pt =
      terms(T(w), s, t, a.ns_r ? a.ns_r[p] : T(0), a.ns_c ? a.ns_c[q] : T(0),
            a.nt_r ? a.nt_r[p] : T(0), a.nt_c ? a.nt_c[q] : T(0));
  if (a.grad_s) a.s[at] = pt.ds;
  if (a.grad_t) a.t[at] = pt.dt;
  if (a.dn) a.dn[at] = pt.dn_i;  // = dn_j for every kind that has one
  PairSums out;
  out.loss = double(pt.loss);
  out.dmu_s = double(pt.dmu_s);
  out.dmu_t = double(pt.dmu_t);
  return out;
}

// The block's sums, each reduced over its threads in a fixed order, to
// sums[block * 3 ...].
__device__ inline void store_block_sums(const PairSums& mine, double* shared, double* sums) {
  const double loss = block_sum(mine.loss, shared);
  const double dmu_s = block_sum(mine.dmu_s, shared);
  const double dmu_t = block_sum(mine.dmu_t, shared);
  if (threadIdx.x == 0) {
    sums[blockIdx.x * 3 + 0] = loss;
    sums[blockIdx.x * 3 + 1] = dmu_s;
    sums[blockIdx.x * 3 + 2] = dmu_t;
  }
}

template <typename T, typename Terms>
__global__ void pair_tile_kernel(Terms terms, PairTileArgs<T> a, TileView view, TileMask mask) {
  __shared__ double shared[kThreads];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPairBlockElements;
  const int64_t count = view.rows * view.cols;
  PairSums sums;
  for (int u = 0; u < kPairItems; ++u) {
    const int64_t e = first + u * kThreads + threadIdx.x;
    if (e >= count) break;
    const int64_t r = e / view.cols, c = e % view.cols, at = r * view.ld + c;
    sums.add(pair_at(terms, a, view, mask, r, c, a.s[at], a.t ? a.t[at] : T(0)));
  }
  store_block_sums(sums, shared, a.sums);
}

template <typename T, typename Terms>
int launch_pair_tile(const Terms& terms, const PairTileArgs<T>& args, const TileView& view,
                     const TileMask& mask, Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  RELKD_LAUNCH(pair_tile_blocks(view), kThreads, stream, pair_tile_kernel<T, Terms>)(
      terms, args, view, mask);
  return launched();
}

// One launcher per kind and dtype, defined in csrc/cuda/pair_tile_<kind>.cu.
int pair_tile_cckd(const PairTileArgs<float>&, const TileView&, const TileMask&, Stream);
int pair_tile_cckd(const PairTileArgs<double>&, const TileView&, const TileMask&, Stream);
int pair_tile_ekd_pos(const PairTileArgs<float>&, const TileView&, const TileMask&, Stream);
int pair_tile_ekd_pos(const PairTileArgs<double>&, const TileView&, const TileMask&, Stream);
int pair_tile_rkd(const PairTileArgs<float>&, const TileView&, const TileMask&, Stream);
int pair_tile_rkd(const PairTileArgs<double>&, const TileView&, const TileMask&, Stream);

}  // namespace cuda
}  // namespace relkd
