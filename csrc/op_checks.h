// Argument checks of every relkd operator, shared by the CPU kernels and the
// CUDA glue, so that both devices accept and refuse exactly the same calls.
// The Python layer validates user input with messages that name the
// argument; these guard the ops when called directly (opcheck, users of
// torch.ops.relkd) so that bad input can never read out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "pair_math.h"

namespace relkd {

// Kernels run below autograd: the ATen calls they make on their (possibly
// requires_grad) inputs must not record graph nodes. Every entry point opens
// one of these.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- tensors
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

// An optional int64 vector of n entries (labels, ids) on the device of `like`.
inline void check_index_vector(const c10::optional<at::Tensor>& t, int64_t n, const char* name,
                               const at::Tensor& like) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n,
                    ",), got ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == like.device(), name, " must be on the device of the ",
                    "embeddings (", like.device(), "), got ", t->device());
}

// Contiguous copy of an optional index vector (labels, ids), or an undefined tensor.
inline at::Tensor contiguous_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

inline const int64_t* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}

template <typename T>
const T* data_or_null_t(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ------------------------------------------------------------- topk_sim
inline void check_topk_sim_args(const at::Tensor& q, const at::Tensor& c, int64_t k,
                                const c10::optional<at::Tensor>& q_labels,
                                const c10::optional<at::Tensor>& c_labels,
                                const c10::optional<at::Tensor>& c_scale) {
  check_matrix(q, "q");
  check_matrix(c, "c");
  check_same(q, c, "q", "c");
  TORCH_CHECK_VALUE(q.size(1) == c.size(1), "q and c must have the same dim, got ", q.size(1),
                    " and ", c.size(1));
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(q_labels.has_value() == c_labels.has_value(),
                    "q_labels and c_labels must be given together");
  check_index_vector(q_labels, q.size(0), "q_labels", q);
  check_index_vector(c_labels, c.size(0), "c_labels", q);
  if (c_scale.has_value()) {
    TORCH_CHECK_VALUE(c_scale->dim() == 1 && c_scale->size(0) == c.size(0),
                      "c_scale must have shape (", c.size(0), ",), got ", c_scale->sizes());
    check_same(*c_scale, c, "c_scale", "c");
  }
}

// ------------------------------------------------------------- pair_dot
// Every value of an int64 index in [-1, bound).
inline void check_index_values(const at::Tensor& idx, int64_t bound, const char* name) {
  if (idx.numel() == 0) return;
  // One reduction (and on a GPU one sync); a CPU index is scanned in place,
  // which is cheaper than a parallel reduction and its barrier.
  int64_t lo = INT64_MAX, hi = INT64_MIN;
  if (idx.device().is_cpu() && idx.is_contiguous()) {
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t e = 0; e < idx.numel(); ++e) {
      lo = std::min(lo, p[e]);
      hi = std::max(hi, p[e]);
    }
  } else {
    const auto range = at::aminmax(idx);
    lo = std::get<0>(range).item<int64_t>();
    hi = std::get<1>(range).item<int64_t>();
  }
  TORCH_CHECK_VALUE(lo >= -1 && hi < bound, name, " values must lie in [-1, ", bound, "), got [",
                    lo, ", ", hi, "]");
}

inline void check_pair_dot_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& idx) {
  check_matrix(a, "a");
  check_matrix(b, "b");
  check_same(a, b, "a", "b");
  TORCH_CHECK_VALUE(a.size(1) == b.size(1), "a and b must have the same dim, got ", a.size(1),
                    " and ", b.size(1));
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == a.size(0), "idx must have shape (",
                    a.size(0), ", k), got ", idx.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == a.device(), "idx must be on the device of a (", a.device(),
                    "), got ", idx.device());
  check_index_values(idx, b.size(0), "idx");
}

inline void check_pair_dot_grad(const at::Tensor& grad, const at::Tensor& a,
                                const at::Tensor& idx) {
  TORCH_CHECK_VALUE(grad.sizes() == idx.sizes(), "grad must have the shape of idx, got ",
                    grad.sizes(), " and ", idx.sizes());
  check_same(grad, a, "grad", "a");
}

// ------------------------------------------------------- pair_list_dot
inline void check_pair_list_args(const at::Tensor& a, const c10::optional<at::Tensor>& b,
                                 const at::Tensor& rows, const at::Tensor& cols) {
  check_matrix(a, "a");
  if (b.has_value()) {
    check_matrix(*b, "b");
    check_same(a, *b, "a", "b");
    TORCH_CHECK_VALUE(a.size(1) == b->size(1), "a and b must have the same dim, got ",
                      a.size(1), " and ", b->size(1));
  }
  TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be 1-D, got ", rows.dim(), "-D");
  check_index_vector(cols, rows.size(0), "cols", a);
  check_index_vector(rows, rows.size(0), "rows", a);
  check_index_values(rows, a.size(0), "rows");
  check_index_values(cols, b.has_value() ? b->size(0) : a.size(0), "cols");
}

inline void check_pair_list_grad(const at::Tensor& grad, const at::Tensor& a,
                                 const at::Tensor& rows) {
  TORCH_CHECK_VALUE(grad.sizes() == rows.sizes(), "grad must have the shape of rows, got ",
                    grad.sizes(), " and ", rows.sizes());
  check_same(grad, a, "grad", "a");
}

// ------------------------------------------------------- relation_penalty
inline void check_relation_penalty_args(const at::Tensor& s, const at::Tensor& t,
                                        const at::Tensor& indices, double margin) {
  check_matrix(s, "s");
  check_same(s, t, "s", "t");
  TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "t must have the shape of s, got ", t.sizes(),
                    " and ", s.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == s.sizes(), "indices must have the shape of s, got ",
                    indices.sizes(), " and ", s.sizes());
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kLong, "indices must be int64, got ",
                    indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == s.device(), "indices must be on the device of s");
  TORCH_CHECK_VALUE(std::isfinite(margin), "margin must be finite, got ", margin);
}

// --------------------------------------------------------- pairwise_loss
// What a pairwise_loss kind reads and which gradients it defines; the
// per-pair math is in pair_math.h.
struct KindInfo {
  pm::Mask mask;
  bool has_teacher, uses_norms, teacher_grad, params_grad;
};

// The kind named `name`, after checking its number of params.
inline KindInfo kind_info(c10::string_view name, int64_t n_params) {
  using pm::Mask;
  if (name == "cckd") {
    TORCH_CHECK_VALUE(n_params >= 1, "cckd needs params = polynomial coefficients, got none");
    return {Mask::All, true, false, true, false};
  }
  if (name == "ekd_pos") {
    TORCH_CHECK_VALUE(n_params >= 3 && n_params % 2 == 1,
                      "ekd_pos needs params = [temperature, s_anchor..., t_anchor...], got ",
                      n_params);
    return {Mask::UpperSameLabel, true, false, false, false};
  }
  if (name == "rkd_dist_sum") return {Mask::OffDiagonal, false, true, false, false};
  if (name == "rkd_distance") {
    TORCH_CHECK_VALUE(n_params == 2, "rkd_distance needs params = [mu_s, mu_t], got ", n_params);
    return {Mask::OffDiagonal, true, true, false, true};
  }
  TORCH_CHECK_VALUE(false, "unknown pairwise_loss kind '", std::string(name),
                    "' (expected cckd, ekd_pos, rkd_dist_sum, rkd_distance)");
  return {};
}

inline void check_rows(const c10::optional<at::Tensor>& t, const at::Tensor& like, int64_t rows,
                       const char* name) {
  TORCH_CHECK_VALUE(t.has_value(), name, " is required by this kind");
  check_matrix(*t, name);
  check_same(*t, like, name, "xs_r");
  TORCH_CHECK_VALUE(t->size(0) == rows, name, " must have ", rows, " rows, got ", t->size(0));
}

// The inputs of a pairwise_loss call, checked and made contiguous.
struct PairwiseArgs {
  KindInfo kind;
  bool symmetric;
  int64_t n_r, n_c;
  at::Tensor xs_r, xt_r, xs_c, xt_c;  // columns alias rows when symmetric; xt_* undefined
                                      // for kinds without a teacher
  at::Tensor labels_r, labels_c, ids_r, ids_c, params;  // optional ones may be undefined
};

inline PairwiseArgs check_pairwise_args(
    c10::string_view kind_name, const at::Tensor& xs_r, const c10::optional<at::Tensor>& xt_r,
    const c10::optional<at::Tensor>& xs_c, const c10::optional<at::Tensor>& xt_c,
    const c10::optional<at::Tensor>& labels_r, const c10::optional<at::Tensor>& labels_c,
    const c10::optional<at::Tensor>& ids_r, const c10::optional<at::Tensor>& ids_c,
    const at::Tensor& params, bool grad_teacher) {
  check_matrix(xs_r, "xs_r");
  TORCH_CHECK_VALUE(params.dim() == 1, "params must be 1-D, got ", params.dim(), "-D");
  check_same(params, xs_r, "params", "xs_r");
  PairwiseArgs a;
  a.kind = kind_info(kind_name, params.numel());
  a.symmetric = !xs_c.has_value();
  a.n_r = xs_r.size(0);
  a.n_c = a.symmetric ? a.n_r : xs_c->size(0);
  if (!a.symmetric) {
    check_rows(xs_c, xs_r, a.n_c, "xs_c");
    TORCH_CHECK_VALUE(xs_c->size(1) == xs_r.size(1), "xs_c must have dim ", xs_r.size(1),
                      ", got ", xs_c->size(1));
  }
  TORCH_CHECK_VALUE(!a.symmetric ||
                        (!xt_c.has_value() && !labels_c.has_value() && !ids_c.has_value()),
                    "xt_c, labels_c and ids_c must be None when xs_c is None (symmetric case)");
  check_index_vector(labels_r, a.n_r, "labels_r", xs_r);
  check_index_vector(ids_r, a.n_r, "ids_r", xs_r);
  check_index_vector(labels_c, a.n_c, "labels_c", xs_r);
  check_index_vector(ids_c, a.n_c, "ids_c", xs_r);
  a.xs_r = xs_r.contiguous();
  a.xs_c = a.symmetric ? a.xs_r : xs_c->contiguous();
  if (a.kind.has_teacher) {
    check_rows(xt_r, xs_r, a.n_r, "xt_r");
    a.xt_r = xt_r->contiguous();
    if (!a.symmetric) {
      check_rows(xt_c, xs_r, a.n_c, "xt_c");
      TORCH_CHECK_VALUE(xt_c->size(1) == xt_r->size(1), "xt_c must have dim ", xt_r->size(1),
                        ", got ", xt_c->size(1));
    }
    a.xt_c = a.symmetric ? a.xt_r : xt_c->contiguous();
  }
  const bool labelled =
      a.kind.mask == pm::Mask::UpperSameLabel || a.kind.mask == pm::Mask::UpperDiffLabel;
  TORCH_CHECK_VALUE(!labelled || (labels_r.has_value() && (a.symmetric || labels_c.has_value())),
                    "this kind needs labels_r (and labels_c when xs_c is given)");
  TORCH_CHECK_VALUE(!grad_teacher || a.kind.teacher_grad, "kind '", std::string(kind_name),
                    "' passes no gradient to the teacher (grad_teacher must be false)");
  a.labels_r = contiguous_or_empty(labels_r);
  a.ids_r = contiguous_or_empty(ids_r);
  a.labels_c = a.symmetric ? a.labels_r : contiguous_or_empty(labels_c);
  a.ids_c = a.symmetric ? a.ids_r : contiguous_or_empty(ids_c);
  a.params = params.contiguous();
  return a;
}

// ------------------------------------------------------------ pair_select
// The inputs of pair_histogram / pair_topk (negative pairs: id_i < id_j,
// labels differ), checked and made contiguous; columns alias rows when
// x_c is None.
struct SelectArgs {
  bool symmetric;
  at::Tensor x_r, x_c, lab_r, lab_c, ids_r, ids_c;
};

// The selection reads its embeddings only through row blocks and a GEMM,
// so on the CPU a matrix of contiguous rows at a larger row stride (EKD's
// every-16th-row sample) is used in place, without a copy.
inline at::Tensor rows_in_place(const at::Tensor& x) {
  const bool unit_rows = x.size(1) <= 1 || x.stride(1) == 1;
  return x.device().is_cpu() && unit_rows && x.stride(0) >= x.size(1) ? x : x.contiguous();
}

inline SelectArgs check_select_args(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                                    const at::Tensor& labels_r,
                                    const c10::optional<at::Tensor>& labels_c,
                                    const c10::optional<at::Tensor>& ids_r,
                                    const c10::optional<at::Tensor>& ids_c) {
  check_matrix(x_r, "x_r");
  SelectArgs a;
  a.symmetric = !x_c.has_value();
  if (!a.symmetric) {
    check_matrix(*x_c, "x_c");
    check_same(x_r, *x_c, "x_r", "x_c");
    TORCH_CHECK_VALUE(x_c->size(1) == x_r.size(1), "x_c must have dim ", x_r.size(1), ", got ",
                      x_c->size(1));
    TORCH_CHECK_VALUE(labels_c.has_value(), "labels_c is required when x_c is given");
  } else {
    TORCH_CHECK_VALUE(!labels_c.has_value() && !ids_c.has_value(),
                      "labels_c and ids_c must be None when x_c is None (symmetric case)");
  }
  a.x_r = rows_in_place(x_r);
  a.x_c = a.symmetric ? a.x_r : rows_in_place(*x_c);
  check_index_vector(labels_r, x_r.size(0), "labels_r", x_r);
  check_index_vector(ids_r, x_r.size(0), "ids_r", x_r);
  check_index_vector(labels_c, a.x_c.size(0), "labels_c", x_r);
  check_index_vector(ids_c, a.x_c.size(0), "ids_c", x_r);
  a.lab_r = labels_r.contiguous();
  a.lab_c = a.symmetric ? a.lab_r : labels_c->contiguous();
  a.ids_r = contiguous_or_empty(ids_r);
  a.ids_c = a.symmetric ? a.ids_r : contiguous_or_empty(ids_c);
  return a;
}

// pair_topk's scalars; the threshold is the order key's bit pattern (32 bits
// for float32).
inline void check_pair_topk_args(const at::Tensor& x_r, int64_t threshold_key, int64_t n_equal,
                                 int64_t topk) {
  TORCH_CHECK_VALUE(topk >= 0, "topk must be >= 0, got ", topk);
  TORCH_CHECK_VALUE(n_equal >= 0, "n_equal must be >= 0, got ", n_equal);
  TORCH_CHECK_VALUE(x_r.scalar_type() == at::kDouble ||
                        (threshold_key >= 0 && threshold_key < (int64_t(1) << 32)),
                    "threshold_key must be a 32-bit order key for float32, got ", threshold_key);
}

inline void check_histogram_args(int64_t key_bits, const at::Tensor& prefixes, int64_t shift,
                                 const at::Tensor& like) {
  TORCH_CHECK_VALUE(prefixes.dim() == 1 && prefixes.scalar_type() == at::kLong,
                    "prefixes must be a 1-D int64 tensor, got ", prefixes.scalar_type(), " ",
                    prefixes.sizes());
  TORCH_CHECK_VALUE(prefixes.device() == like.device(), "prefixes must be on the device of x_r (",
                    like.device(), "), got ", prefixes.device());
  TORCH_CHECK_VALUE(prefixes.numel() > 0, "prefixes must hold at least one prefix");
  TORCH_CHECK_VALUE(std::get<0>(at::_unique(prefixes)).numel() == prefixes.numel(),
                    "prefixes must be distinct (one histogram each)");
  TORCH_CHECK_VALUE(shift >= 0 && shift % 16 == 0 && shift + 16 <= key_bits,
                    "shift must be one of 0", key_bits > 32 ? ", 16, 32, 48" : ", 16",
                    " for this dtype, got ", shift);
}

// pair_histogram_topk's collection arguments, checked: per first-pass bin
// (the top 16 key bits), whether its whole keys are kept (empty: none).
inline std::vector<uint8_t> collect_bin_flags(const c10::optional<at::Tensor>& ranges,
                                              int64_t cap, int64_t shift, int64_t key_bits,
                                              int64_t top_min_key) {
  constexpr int64_t kBins = int64_t(1) << 16;
  TORCH_CHECK_VALUE(cap >= 0, "collect_cap must be >= 0, got ", cap);
  TORCH_CHECK_VALUE(key_bits == 64 || (top_min_key >= 0 && top_min_key < (int64_t(1) << 32)),
                    "top_min_key must be a 32-bit order key for float32, got ", top_min_key);
  const bool first_pass = shift + 16 == key_bits;
  std::vector<uint8_t> in_bin;
  if (!ranges.has_value() || ranges->numel() == 0) return in_bin;
  const at::Tensor& r = *ranges;
  TORCH_CHECK_VALUE(r.dim() == 2 && r.size(1) == 2 && r.scalar_type() == at::kLong &&
                        r.device().is_cpu(),
                    "collect_ranges must be a CPU int64 tensor of shape (R, 2), got ",
                    r.scalar_type(), " ", r.sizes(), " on ", r.device());
  TORCH_CHECK_VALUE(first_pass, "collect_ranges: keys are collected in the first pass only (shift ",
                    key_bits - 16, "), got shift ", shift);
  in_bin.assign(kBins, 0);
  const auto rc = r.contiguous();
  const int64_t* p = rc.data_ptr<int64_t>();
  for (int64_t e = 0; e < r.size(0); ++e) {
    const int64_t lo = p[2 * e], hi = p[2 * e + 1];
    TORCH_CHECK_VALUE(0 <= lo && lo <= hi && hi < kBins,
                      "collect_ranges: every range (lo, hi) needs 0 <= lo <= hi < 65536, got (",
                      lo, ", ", hi, ")");
    std::fill(in_bin.begin() + lo, in_bin.begin() + hi + 1, uint8_t(1));
  }
  return in_bin;
}

// -------------------------------------------------------- rkd_angle_loss
// The student's and the teacher's rows (the angles' vertices) and columns
// (es_c, et_c: both or neither; the rows when absent).
inline void check_rkd_angle_args(const at::Tensor& es_r, const at::Tensor& et_r,
                                 const c10::optional<at::Tensor>& es_c,
                                 const c10::optional<at::Tensor>& et_c,
                                 int64_t anchors_per_group) {
  check_matrix(es_r, "es_r");
  check_matrix(et_r, "et_r");
  check_same(es_r, et_r, "es_r", "et_r");
  TORCH_CHECK_VALUE(et_r.size(0) == es_r.size(0), "the teacher's rows must match the student's");
  TORCH_CHECK_VALUE(es_c.has_value() == et_c.has_value(), "es_c and et_c must be given together");
  if (es_c.has_value()) {
    check_matrix(*es_c, "es_c");
    check_matrix(*et_c, "et_c");
    check_same(es_r, *es_c, "es_r", "es_c");
    check_same(es_r, *et_c, "es_r", "et_c");
    TORCH_CHECK_VALUE(et_c->size(0) == es_c->size(0), "the teacher's rows must match the student's");
    TORCH_CHECK_VALUE(es_c->size(1) == es_r.size(1) && et_c->size(1) == et_r.size(1),
                      "columns must have the rows' dimensions");
  }
  TORCH_CHECK_VALUE(anchors_per_group >= 0, "anchors_per_group must be >= 0, got ",
                    anchors_per_group);
}

}  // namespace relkd
