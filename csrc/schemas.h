// Schemas of every relkd operator, in one place: the relkd library defines
// them (csrc/ops.cpp), and so does the CPU-emulated build of the CUDA kernels
// that the tests compile (tests/cuda_emulation).
#pragma once

#include <torch/library.h>

namespace relkd {

inline void define_operators(torch::Library& m) {
  // Per row i of q: the k largest c_scale[j] * q_i.c_j over valid columns j
  // (c_labels[j] != q_labels[i]; j != i + self_offset when exclude_self),
  // sorted descending, ties to the smaller j, padding (-inf, -1). float32 /
  // float64; on CUDA also bfloat16 q and c (float32 values).
  m.def(
      "topk_sim(Tensor q, Tensor c, int k, Tensor? q_labels=None, Tensor? c_labels=None, "
      "Tensor? c_scale=None, bool exclude_self=False, int self_offset=0) -> (Tensor, Tensor)");

  // out[i, s] = a_i . b_{idx[i, s]}, 0 where idx is -1.
  m.def("pair_dot(Tensor a, Tensor b, Tensor idx) -> Tensor");
  m.def(
      "pair_dot_backward(Tensor grad, Tensor a, Tensor b, Tensor idx, bool need_a, bool need_b) "
      "-> (Tensor, Tensor)");

  // out[p] = a_{rows[p]} . b_{cols[p]} over a list of pairs (b None: the
  // columns are rows of a too), 0 where rows[p] or cols[p] is -1; the
  // backward returns the gradients of sum_p grad[p] * out[p] for a (with b
  // None, from both ends of every pair) and b (empty when b is None or not
  // needed). (CPU only; other devices gather with index_select.)
  m.def("pair_list_dot(Tensor a, Tensor? b, Tensor rows, Tensor cols) -> Tensor");
  m.def(
      "pair_list_dot_backward(Tensor grad, Tensor a, Tensor? b, Tensor rows, Tensor cols, "
      "bool need_a, bool need_b) -> (Tensor, Tensor)");

  // RAD's epilogue (SPEC §2): the sum over the entries with indices >= 0 of
  // phi(s - t) (metric "hinge": max(0, d - margin), "l2": d^2, "l1": |d|)
  // and their count; the backward returns grad * d total / d s and / d t.
  // (CPU only; other devices use tensor ops.)
  m.def(
      "relation_penalty(Tensor s, Tensor t, Tensor indices, str metric, float margin) "
      "-> (Tensor, Tensor)");
  m.def(
      "relation_penalty_backward(Tensor grad, Tensor s, Tensor t, Tensor indices, str metric, "
      "float margin) -> (Tensor, Tensor)");

  // Sum over the (row, column) pairs selected by the kind's mask of the
  // kind's pair loss, and its gradients (see csrc/cpu/pair_kinds.h). xs_c /
  // xt_c None = columns are the rows (symmetric case). Returns
  // (loss, grad_xs_r, grad_xs_c, grad_xt_r, grad_xt_c, grad_params); a
  // gradient that was not asked for is an empty tensor. float32 / float64;
  // on CUDA also bfloat16 embeddings (then float32 params and loss,
  // bfloat16 gradients of the embeddings).
  m.def(
      "pairwise_loss(str kind, Tensor xs_r, Tensor? xt_r, Tensor? xs_c, Tensor? xt_c, "
      "Tensor? labels_r, Tensor? labels_c, Tensor? ids_r, Tensor? ids_c, Tensor params, "
      "bool grad_student, bool grad_teacher) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Every row's k largest x_i . x_j over the other rows j != i (of another
  // label when labels are given), each product computed once
  // (hardest_identities, batch mining); padding (-inf, -1). (CPU only.)
  m.def("topk_sim_symmetric(Tensor x, int k, Tensor? labels=None) -> (Tensor, Tensor)");

  // Row L2 normalisation as F.normalize computes it: (x_i / max(|x_i|, eps),
  // |x_i|), and the gradient for x of sum(grad * y) from (y, |x|). (CPU
  // only; other devices run F.normalize.)
  m.def("normalize_rows(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("normalize_rows_backward(Tensor grad, Tensor y, Tensor norm, float eps) -> Tensor");

  // SP's Gram identity (relkd/fused.py, _SPGramIdentity) in float64: the
  // Gram matrices (A_s^T A_s, A_t^T A_t, A_s^T A_t) of the batch A (F when
  // a_s and a_t are None) and, per row i of F, (f_s F_ss f_s, f_t F_tt f_t,
  // f_s F_st f_t) against them. (CPU only; CUDA runs the PyTorch form.)
  m.def(
      "sp_gram_forward(Tensor f_s, Tensor f_t, Tensor? a_s, Tensor? a_t) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The gradients of sum_i w_s,i r_s,i + w_t,i r_t,i + u_i c_i (the row
  // forms above, the Grams as functions of the batch) for (f_s, f_t, a_s,
  // a_t); with a_s None the batch's part is added to the rows' and the last
  // two are empty, as are the student's (teacher's) unless need_s (need_t).
  m.def(
      "sp_gram_backward(Tensor f_s, Tensor f_t, Tensor? a_s, Tensor? a_t, Tensor gram_ss, "
      "Tensor gram_tt, Tensor gram_st, Tensor w_s, Tensor w_t, Tensor u, bool need_s, "
      "bool need_t) -> (Tensor, Tensor, Tensor, Tensor)");

  // Negative pairs (id_i < id_j, labels differ): histogram of the 16-bit
  // digit at `shift` of the order keys of x_i.x_j, one histogram per key
  // prefix (the key bits above shift + 16). Returns int64 (P, 65536).
  m.def(
      "pair_histogram(Tensor x_r, Tensor? x_c, Tensor labels_r, Tensor? labels_c, Tensor? ids_r, "
      "Tensor? ids_c, Tensor prefixes, int shift) -> Tensor");

  // pair_histogram, plus the `topk` negative pairs with the largest value
  // (ties to the smaller (id_i, id_j)) found in the same sweep over the
  // pairs, as pair_topk returns them: EKD's first radix pass and its top-k
  // hard negatives without a separate pass. In the first pass (shift =
  // key bits - 16) it also returns the whole order keys (int64 bit patterns,
  // descending) of the pairs whose top 16 key bits lie in one of the
  // inclusive collect_ranges (R, 2), or none if there are more than
  // collect_cap of them. With top_min_key (an order key's bit pattern, as
  // pair_topk's threshold_key) the top pairs are the best topk among those
  // whose key is >= top_min_key (fewer if fewer; 0: every pair): on CUDA,
  // where a pass cannot keep a running bar cheaply, such pairs are appended
  // to a buffer during the sweep, so a key predicted below the k-th pair's
  // gives the exact top-k in the same pass.
  m.def(
      "pair_histogram_topk(Tensor x_r, Tensor? x_c, Tensor labels_r, Tensor? labels_c, "
      "Tensor? ids_r, Tensor? ids_c, Tensor prefixes, int shift, int topk, "
      "Tensor? collect_ranges=None, int collect_cap=0, int top_min_key=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Negative pairs with order key > threshold_key, plus the first n_equal
  // (by (id_i, id_j)) with key == threshold_key; at most topk, sorted by value
  // descending then (id_i, id_j). Returns (values, id_i, id_j) of length
  // topk, padded with (-inf, -1, -1). threshold_key is the key's bit pattern.
  m.def(
      "pair_topk(Tensor x_r, Tensor? x_c, Tensor labels_r, Tensor? labels_c, Tensor? ids_r, "
      "Tensor? ids_c, int threshold_key, int n_equal, int topk) -> (Tensor, Tensor, Tensor)");

  // RKD's angle term (SPEC §6) with the rows as the angles' vertices and
  // the columns (the rows when absent) as their other two points: the sum
  // over rows a and column pairs (b, c) of smoothL1(psi_s - psi_t), psi_abc
  // = normalize(x_b - x_a) . normalize(x_c - x_a), in the embeddings' dtype
  // (float32 / float64), and, with grad_student, its gradient for the
  // student's rows and columns (the teacher has none): (loss, grad_r,
  // grad_c), grad_c empty without columns (grad_r then holds both parts).
  // Rows go anchors_per_group at a time (0: as many as 256 MiB holds).
  m.def(
      "rkd_angle_loss(Tensor es_r, Tensor et_r, Tensor? es_c, Tensor? et_c, "
      "bool grad_student, int anchors_per_group=0) -> (Tensor, Tensor, Tensor)");
}

}  // namespace relkd
