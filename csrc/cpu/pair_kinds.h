// The pair losses of pairwise_loss, one struct per kind: the per-pair value
// and its derivatives, evaluated one tile row at a time. The formulas are
// those of shared/SPEC.md; relkd/reference.py transcribes the same ones.
//
// Each kind declares its mask, whether it reads the teacher relation t and
// the squared row norms, and fills for every pair of weight w:
//   loss  += w * l(s, t)
//   gs[j]  = w * dl/ds      (s = student dot product)
//   gt[j]  = w * dl/dt      (kinds that allow a teacher gradient)
//   dn_r  += w * dl/dn_i,  dn_c[j] += w * dl/dn_j   (n = squared row norm)
//   dmu   += w * dl/dparams[0]                       (RKD's student mean)
#pragma once

#include <cmath>
#include <string>

#include "pairs.h"

namespace relkd {

template <typename T>
struct TileRow {
  int64_t n;                    // columns in this row
  const T* w;                   // pair weights
  const T* s;                   // student dot products
  const T* t;                   // teacher dot products (kinds with a teacher)
  T ns_r, nt_r;                 // squared norms of this row (RKD)
  const T* ns_c;                // squared norms of the columns (RKD)
  const T* nt_c;
  T* gs;                        // out, or nullptr when not needed
  T* gt;
  T* dn_c;                      // out, accumulated (RKD)
};

struct RowSums {
  double loss = 0, dn_r = 0, dmu = 0;
};

// CCKD (SPEC §4): l = (phi(s) - phi(t))^2 with phi the polynomial whose
// coefficients are params (Taylor-expanded Gaussian RBF, or u for bilinear).
template <typename T>
struct CckdKind {
  static constexpr Mask mask = Mask::All;
  static constexpr bool has_teacher = true, uses_norms = false, teacher_grad = true;
  const T* coef;
  int64_t n_coef;

  T phi(T u) const {
    T acc = coef[n_coef - 1];
    for (int64_t p = n_coef - 2; p >= 0; --p) acc = acc * u + coef[p];
    return acc;
  }
  T dphi(T u) const {
    T acc = 0;
    for (int64_t p = n_coef - 1; p >= 1; --p) acc = acc * u + T(p) * coef[p];
    return acc;
  }
  void row(const TileRow<T>& r, RowSums& out) const {
    double loss = 0;
    for (int64_t j = 0; j < r.n; ++j) {
      const T diff = phi(r.s[j]) - phi(r.t[j]);
      loss += double(r.w[j] * diff * diff);
      if (r.gs) r.gs[j] = r.w[j] * T(2) * diff * dphi(r.s[j]);
      if (r.gt) r.gt[j] = -r.w[j] * T(2) * diff * dphi(r.t[j]);
    }
    out.loss += loss;
  }
};

// Temperature sigmoid of EKD (SPEC §3.5) and its derivative, with the
// clamp's zero gradient outside [-50, 50], as autograd computes it.
template <typename T>
inline T ekd_sigmoid(T u, T temperature, T* deriv) {
  const T x = -u / temperature;
  const T xc = std::min(std::max(x, T(-50)), T(50));
  const T e = std::exp(xc);
  const T y = T(1) / (T(1) + e);
  if (deriv) *deriv = (x >= T(-50) && x <= T(50)) ? e * y * y / temperature : T(0);
  return y;
}

// EKD positive pairs (SPEC §3.6): l = (rank_s(s) - rank_t(t))^2 with
// rank(v) = sum_a sigmoid_T(v - anchor_a). params = [T, s_anchor, t_anchor].
template <typename T>
struct EkdPosKind {
  static constexpr Mask mask = Mask::UpperSameLabel;
  static constexpr bool has_teacher = true, uses_norms = false, teacher_grad = false;
  T temperature;
  const T* s_anchor;
  const T* t_anchor;
  int64_t n_anchor;

  void row(const TileRow<T>& r, RowSums& out) const {
    for (int64_t j = 0; j < r.n; ++j) {
      if (r.gs) r.gs[j] = 0;
      if (r.w[j] == T(0)) continue;  // positives are sparse: skip the exps
      T rank_s = 0, rank_t = 0, drank_s = 0;
      for (int64_t a = 0; a < n_anchor; ++a) {
        T d;
        rank_s += ekd_sigmoid(r.s[j] - s_anchor[a], temperature, &d);
        drank_s += d;
        rank_t += ekd_sigmoid(r.t[j] - t_anchor[a], temperature, static_cast<T*>(nullptr));
      }
      const T diff = rank_s - rank_t;
      out.loss += double(r.w[j] * diff * diff);
      if (r.gs) r.gs[j] = r.w[j] * T(2) * diff * drank_s;
    }
  }
};

// RKD pairwise distance (SPEC §6) from a dot product and squared norms:
// d = sqrt(max(n_i + n_j - 2 dot, 1e-12)); the clamp passes no gradient.
template <typename T>
struct Distance {
  T d, dd_dot, dd_norm;  // value, d/d(dot), d/d(n_i) (= d/d(n_j))
};

template <typename T>
inline Distance<T> rkd_distance(T dot, T n_i, T n_j) {
  const T arg = n_i + n_j - T(2) * dot;
  const bool clamped = !(arg >= T(1e-12));
  const T d = std::sqrt(clamped && !std::isnan(arg) ? T(1e-12) : arg);
  if (clamped) return {d, T(0), T(0)};
  return {d, T(-1) / d, T(0.5) / d};
}

// Sum of the student's distances over i != j: the numerator of RKD's mean.
template <typename T>
struct RkdDistSumKind {
  static constexpr Mask mask = Mask::OffDiagonal;
  static constexpr bool has_teacher = false, uses_norms = true, teacher_grad = false;

  void row(const TileRow<T>& r, RowSums& out) const {
    double loss = 0, dn_r = 0;
    for (int64_t j = 0; j < r.n; ++j) {
      const Distance<T> ds = rkd_distance(r.s[j], r.ns_r, r.ns_c[j]);
      loss += double(r.w[j] * ds.d);
      if (r.gs) {
        r.gs[j] = r.w[j] * ds.dd_dot;
        dn_r += double(r.w[j] * ds.dd_norm);
        r.dn_c[j] += r.w[j] * ds.dd_norm;
      }
    }
    out.loss += loss;
    out.dn_r += dn_r;
  }
};

// RKD distance loss (SPEC §6): l = smoothL1(d_s / mu_s, d_t / mu_t), beta 1.
// params = [mu_s, mu_t]; the gradient reaches mu_s (dmu), not mu_t.
template <typename T>
struct RkdDistanceKind {
  static constexpr Mask mask = Mask::OffDiagonal;
  static constexpr bool has_teacher = true, uses_norms = true, teacher_grad = false;
  T mu_s, mu_t;

  void row(const TileRow<T>& r, RowSums& out) const {
    double loss = 0, dn_r = 0, dmu = 0;
    for (int64_t j = 0; j < r.n; ++j) {
      const Distance<T> ds = rkd_distance(r.s[j], r.ns_r, r.ns_c[j]);
      const Distance<T> dt = rkd_distance(r.t[j], r.nt_r, r.nt_c[j]);
      const T x = ds.d / mu_s - dt.d / mu_t;
      const T ax = std::abs(x);
      loss += double(r.w[j] * (ax < T(1) ? T(0.5) * x * x : ax - T(0.5)));
      if (r.gs) {
        const T h = ax < T(1) ? x : (x > T(0) ? T(1) : (x < T(0) ? T(-1) : x));
        const T dl_dd = r.w[j] * h / mu_s;
        r.gs[j] = dl_dd * ds.dd_dot;
        dn_r += double(dl_dd * ds.dd_norm);
        r.dn_c[j] += dl_dd * ds.dd_norm;
        dmu -= double(dl_dd * ds.d / mu_s);
      }
    }
    out.loss += loss;
    out.dn_r += dn_r;
    out.dmu += dmu;
  }
};

}  // namespace relkd
