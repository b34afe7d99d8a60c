// The kinds of pairwise_loss: for each, its mask, which inputs it reads,
// which gradients it defines, and its per-pair terms (csrc/pair_math.h, the
// same functions the CUDA kernels call). The formulas are those of
// docs/SPEC.md; relkd/reference.py transcribes them independently.
#pragma once

#include "pairs.h"

namespace relkd {

// The inputs of one pair: weight, student and teacher dot products, and the
// squared norms of its row and column (kinds that use them).
template <typename T>
struct PairArgs {
  T w, s, t, ns_i, ns_j, nt_i, nt_j;
};

// CCKD (SPEC §4): params = coefficients of the polynomial phi.
template <typename T>
struct CckdKind {
  static constexpr Mask mask = Mask::All;
  static constexpr bool has_teacher = true, uses_norms = false, teacher_grad = true,
                        params_grad = false;
  const T* coef;
  int64_t n_coef;
  pm::PairTerms<T> pair(const PairArgs<T>& p) const {
    return pm::cckd_pair(p.w, p.s, p.t, coef, n_coef);
  }
};

// EKD positive pairs (SPEC §3.6): params = [temperature, s_anchor..., t_anchor...].
template <typename T>
struct EkdPosKind {
  static constexpr Mask mask = Mask::UpperSameLabel;
  static constexpr bool has_teacher = true, uses_norms = false, teacher_grad = false,
                        params_grad = false;
  T temperature;
  const T* s_anchor;
  const T* t_anchor;
  int64_t n_anchor;
  pm::PairTerms<T> pair(const PairArgs<T>& p) const {
    return pm::ekd_pos_pair(p.w, p.s, p.t, temperature, s_anchor, t_anchor, n_anchor);
  }
};

// Sum of the student's distances over i != j: the numerator of RKD's mean.
template <typename T>
struct RkdDistSumKind {
  static constexpr Mask mask = Mask::OffDiagonal;
  static constexpr bool has_teacher = false, uses_norms = true, teacher_grad = false,
                        params_grad = false;
  pm::PairTerms<T> pair(const PairArgs<T>& p) const {
    return pm::rkd_dist_sum_pair(p.w, p.s, p.ns_i, p.ns_j);
  }
};

// RKD distance loss (SPEC §6): params = [mu_s, mu_t], both differentiated.
template <typename T>
struct RkdDistanceKind {
  static constexpr Mask mask = Mask::OffDiagonal;
  static constexpr bool has_teacher = true, uses_norms = true, teacher_grad = false,
                        params_grad = true;
  T mu_s, mu_t;
  pm::PairTerms<T> pair(const PairArgs<T>& p) const {
    return pm::rkd_distance_pair(p.w, p.s, p.t, p.ns_i, p.ns_j, p.nt_i, p.nt_j, mu_s, mu_t);
  }
};

}  // namespace relkd
