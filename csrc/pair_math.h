// Per-pair math of every relkd kernel, shared by the CPU (csrc/cpu) and CUDA
// (csrc/cuda) implementations: pair masks, the float ordering used by mining
// and selection, and each pairwise_loss kind's value and derivatives. It is
// torch-free and every function is host + device, so the CPU tests exercise
// the very formulas the GPU runs. The math is that of docs/SPEC.md;
// relkd/reference.py transcribes it independently.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define RELKD_HD __host__ __device__ __forceinline__
#else
#define RELKD_HD inline
#endif

namespace relkd {
namespace pm {

// ------------------------------------------------------------ scalar helpers
// Overloads that resolve to the same libm / CUDA math function on both sides.
RELKD_HD float exp_of(float x) { return expf(x); }
RELKD_HD double exp_of(double x) { return exp(x); }
RELKD_HD float sqrt_of(float x) { return sqrtf(x); }
RELKD_HD double sqrt_of(double x) { return sqrt(x); }
template <typename T> RELKD_HD T abs_of(T x) { return x < T(0) ? -x : x; }
template <typename T> RELKD_HD T min_of(T a, T b) { return b < a ? b : a; }
template <typename T> RELKD_HD T max_of(T a, T b) { return a < b ? b : a; }
template <typename T> RELKD_HD bool is_nan(T x) { return x != x; }

// ------------------------------------------------------------------ masks
// Which ordered (row, column) pairs an all-pairs op visits. Rows and columns
// carry ids (global sample indices) and, for the label masks, labels.
enum class Mask : int {
  All = 0,             // every ordered pair, diagonal included (CCKD)
  OffDiagonal = 1,     // id_i != id_j (RKD)
  UpperSameLabel = 2,  // id_i < id_j, same label: positive pairs (EKD)
  UpperDiffLabel = 3,  // id_i < id_j, labels differ: negative pairs (EKD)
};

RELKD_HD int ordered_mask(Mask m, int64_t id_i, int64_t id_j, int64_t lab_i, int64_t lab_j) {
  switch (m) {
    case Mask::All: return 1;
    case Mask::OffDiagonal: return id_i != id_j;
    case Mask::UpperSameLabel: return id_i < id_j && lab_i == lab_j;
    case Mask::UpperDiffLabel: return id_i < id_j && lab_i != lab_j;
  }
  return 0;
}

// Weight of the pair at (row position p, column position q): 0, 1 or 2. In
// the symmetric case (columns are the rows) only q >= p is visited and the
// unordered pair {p, q} gets m(p, q) + m(q, p), so a loss symmetric in
// (i, j) sums exactly as over all ordered pairs, at half the cost.
RELKD_HD int pair_weight(Mask m, bool symmetric, int64_t p, int64_t q, int64_t id_p, int64_t id_q,
                         int64_t lab_p, int64_t lab_q) {
  if (!symmetric) return ordered_mask(m, id_p, id_q, lab_p, lab_q);
  if (q < p) return 0;
  if (q == p) return ordered_mask(m, id_p, id_p, lab_p, lab_p);
  return ordered_mask(m, id_p, id_q, lab_p, lab_q) + ordered_mask(m, id_q, id_p, lab_q, lab_p);
}

// --------------------------------------------------------------- ordering
// Unsigned key whose integer order is the value order (SPEC §9): NaN -> 0,
// below -inf; -0.0 -> +0.0. Radix selection and top-k work on these keys.
template <typename T> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename T>
RELKD_HD typename KeyOf<T>::type order_key(T v) {
  using K = typename KeyOf<T>::type;
  const K sign = K(1) << (sizeof(K) * 8 - 1);
  if (is_nan(v)) return 0;
  if (v == T(0)) v = T(0);
  K bits;
  memcpy(&bits, &v, sizeof(K));
  return (bits & sign) ? K(~bits) : K(bits | sign);
}

// Mining order: larger value first, NaN below every number, ties to the
// smaller index.
template <typename T>
RELKD_HD bool ranks_below(T v1, int64_t j1, T v2, int64_t j2) {
  const bool n1 = is_nan(v1), n2 = is_nan(v2);
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 < v2;
  return j1 > j2;
}

// ------------------------------------------------------ pair loss kinds
// Each kind maps one pair's student dot product s (and teacher dot product
// t, squared row norms n) to its loss and derivatives, scaled by the pair
// weight w. Fields a kind does not produce stay zero.
template <typename T>
struct PairTerms {
  T loss = 0;
  T ds = 0;           // d loss / d s
  T dt = 0;           // d loss / d t (kinds with a teacher gradient)
  T dn_i = 0, dn_j = 0;  // d loss / d squared norms of the row / column (RKD)
  T dmu_s = 0, dmu_t = 0;  // d loss / d params[0], params[1] (RKD's means)
};

// CCKD (SPEC §4): phi is the polynomial with coefficients coef[0..n).
template <typename T>
RELKD_HD T polynomial(const T* coef, int64_t n, T u) {
  T acc = coef[n - 1];
  for (int64_t p = n - 2; p >= 0; --p) acc = acc * u + coef[p];
  return acc;
}

template <typename T>
RELKD_HD T polynomial_derivative(const T* coef, int64_t n, T u) {
  T acc = 0;
  for (int64_t p = n - 1; p >= 1; --p) acc = acc * u + T(p) * coef[p];
  return acc;
}

// l = (phi(s) - phi(t))^2.
template <typename T>
RELKD_HD PairTerms<T> cckd_pair(T w, T s, T t, const T* coef, int64_t n_coef) {
  PairTerms<T> r;
  const T diff = polynomial(coef, n_coef, s) - polynomial(coef, n_coef, t);
  r.loss = w * diff * diff;
  r.ds = w * T(2) * diff * polynomial_derivative(coef, n_coef, s);
  r.dt = -w * T(2) * diff * polynomial_derivative(coef, n_coef, t);
  return r;
}

// EKD's temperature sigmoid (SPEC §3.5) 1 / (1 + exp(clamp(-u/T, -50, 50)))
// and its derivative, zero outside the clamp as autograd computes it.
template <typename T>
RELKD_HD T ekd_sigmoid(T u, T temperature, T* deriv) {
  const T x = -u / temperature;
  const T xc = min_of(max_of(x, T(-50)), T(50));
  const T e = exp_of(xc);
  const T y = T(1) / (T(1) + e);
  if (deriv) *deriv = (x >= T(-50) && x <= T(50)) ? e * y * y / temperature : T(0);
  return y;
}

// EKD positive pair (SPEC §3.6): l = (rank_s(s) - rank_t(t))^2 with
// rank(v) = sum_a sigmoid_T(v - anchor_a). No teacher gradient.
template <typename T>
RELKD_HD PairTerms<T> ekd_pos_pair(T w, T s, T t, T temperature, const T* s_anchor,
                                   const T* t_anchor, int64_t n_anchor) {
  PairTerms<T> r;
  T rank_s = 0, rank_t = 0, drank_s = 0;
  for (int64_t a = 0; a < n_anchor; ++a) {
    T d;
    rank_s += ekd_sigmoid(s - s_anchor[a], temperature, &d);
    drank_s += d;
    rank_t += ekd_sigmoid(t - t_anchor[a], temperature, static_cast<T*>(nullptr));
  }
  const T diff = rank_s - rank_t;
  r.loss = w * diff * diff;
  r.ds = w * T(2) * diff * drank_s;
  return r;
}

// RKD pairwise distance (SPEC §6) from a dot product and squared norms:
// d = sqrt(max(n_i + n_j - 2 dot, 1e-12)); the clamp passes no gradient.
template <typename T>
struct Distance {
  T d, dd_dot, dd_norm;  // value, d/d(dot), d/d(n_i) (= d/d(n_j))
};

template <typename T>
RELKD_HD Distance<T> rkd_distance(T dot, T n_i, T n_j) {
  const T arg = n_i + n_j - T(2) * dot;
  const bool clamped = !(arg >= T(1e-12));
  const T d = sqrt_of(clamped && !is_nan(arg) ? T(1e-12) : arg);
  if (clamped) return {d, T(0), T(0)};
  return {d, T(-1) / d, T(0.5) / d};
}

// One term of the student's distance sum over i != j (RKD's mean).
template <typename T>
RELKD_HD PairTerms<T> rkd_dist_sum_pair(T w, T s, T n_i, T n_j) {
  PairTerms<T> r;
  const Distance<T> ds = rkd_distance(s, n_i, n_j);
  r.loss = w * ds.d;
  r.ds = w * ds.dd_dot;
  r.dn_i = r.dn_j = w * ds.dd_norm;
  return r;
}

// RKD distance loss (SPEC §6): l = smoothL1(d_s / mu_s - d_t / mu_t), beta 1.
// The teacher's distance gets no gradient; both means do.
template <typename T>
RELKD_HD PairTerms<T> rkd_distance_pair(T w, T s, T t, T ns_i, T ns_j, T nt_i, T nt_j, T mu_s,
                                        T mu_t) {
  PairTerms<T> r;
  const Distance<T> ds = rkd_distance(s, ns_i, ns_j);
  const Distance<T> dt = rkd_distance(t, nt_i, nt_j);
  const T x = ds.d / mu_s - dt.d / mu_t;
  const T ax = abs_of(x);
  r.loss = w * (ax < T(1) ? T(0.5) * x * x : ax - T(0.5));
  // smooth L1's derivative; sign(x) outside |x| < 1, and NaN stays NaN.
  const T h = ax < T(1) ? x : (x > T(0) ? T(1) : (x < T(0) ? T(-1) : x));
  const T dl_dds = w * h / mu_s;
  r.ds = dl_dds * ds.dd_dot;
  r.dn_i = r.dn_j = dl_dds * ds.dd_norm;
  r.dmu_s = -dl_dds * ds.d / mu_s;
  r.dmu_t = w * h * dt.d / (mu_t * mu_t);
  return r;
}

}  // namespace pm
}  // namespace relkd
