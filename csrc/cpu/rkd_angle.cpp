// RKD's angle term (SPEC §6) without its N x N x D differences and N x N x N
// angles: anchors a are taken a few at a time, and for each the unit
// differences u_ab = normalize(x_b - x_a) of every column b, their Gram
// matrix psi_a = U_a U_a^T (the angles at a), the teacher's alike, and the
// smooth-L1 sum of psi_s - psi_t with its gradient are computed before the
// next anchors: peak memory O(B (N D + N^2)) for B anchors, B set by a 256
// MiB budget (at least 1). Written with ATen ops (GEMMs by bmm), so the same
// code runs on CUDA tensors. The arithmetic is the reference's (F.normalize
// then bmm), per anchor: O(N^2 D) each, O(N^3 D) in all.
//
// Gradient, per anchor a (h' = clamp(r, -1, 1), smooth L1's with beta 1):
//   dU_a = 2 h'(psi_s - psi_t) U_a   (psi symmetric in b, c)
//   d(x_b - x_a) = (dU_ab - u_ab (u_ab . dU_ab)) / |x_b - x_a|, or dU_ab / eps
//                  where |x_b - x_a| <= eps (F.normalize's clamp)
// added to column b and subtracted from anchor a. The teacher has none.
#include <algorithm>
#include <vector>

#include "common.h"

namespace relkd {
namespace {

constexpr double kNormEps = 1e-12;                      // F.normalize's (SPEC: EPS)
constexpr int64_t kChunkBytes = int64_t(256) << 20;     // per group of anchors

// Anchors per group: the per-anchor tensors (student differences, units,
// their gradients; teacher differences and units; three N x N matrices)
// within kChunkBytes.
int64_t group_within_budget(int64_t n_c, int64_t ds, int64_t dt, int64_t element) {
  const int64_t per_anchor = element * n_c * (4 * ds + 2 * dt + 3 * n_c);
  return std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, per_anchor));
}

struct Units {
  at::Tensor unit, norm;  // B x N x D unit differences, B x N x 1 their norms
};

// The smooth-L1 (beta 1) sum of r = psi_s - psi_t (a 0-dim float64 tensor),
// and, with_grad, psi_s overwritten by h'(r) = clamp(r, -1, 1). On the CPU
// one pass in fixed chunks, summed in chunk order (the same bits for any
// thread count): the ATen form below makes about eight passes over these
// B x N x N tensors, which cost more than their GEMMs.
at::Tensor smooth_l1_sum(at::Tensor& psi_s, const at::Tensor& psi_t, bool with_grad) {
  if (!psi_s.is_cpu()) {
    const at::Tensor r = psi_s - psi_t, abs_r = r.abs();
    const at::Tensor total = at::where(abs_r < 1, 0.5 * r * r, abs_r - 0.5).sum(at::kDouble);
    if (with_grad) psi_s = r.clamp(-1, 1);
    return total;
  }
  constexpr int64_t kChunk = int64_t(1) << 16;
  const int64_t n = psi_s.numel();
  std::vector<double> partial(static_cast<size_t>(ceil_div(n, kChunk)), 0.0);
  AT_DISPATCH_FLOATING_TYPES(psi_s.scalar_type(), "rkd_angle_loss", [&] {
    scalar_t* s = psi_s.data_ptr<scalar_t>();
    const scalar_t* t = psi_t.data_ptr<scalar_t>();
    parallel_chunks(n, kChunk, [&](int64_t begin, int64_t end) {
      double sum = 0;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t r = s[i] - t[i], a = std::abs(r);
        sum += a < 1 ? 0.5 * double(r) * double(r) : double(a) - 0.5;
        if (with_grad) s[i] = std::min<scalar_t>(std::max<scalar_t>(r, -1), 1);
      }
      partial[static_cast<size_t>(begin / kChunk)] = sum;
    });
  });
  double total = 0;
  for (const double p : partial) total += p;
  return at::scalar_tensor(total, psi_s.options().dtype(at::kDouble));
}

// normalize(columns - anchor) for each anchor, as F.normalize(p=2, eps) does.
Units unit_differences(const at::Tensor& anchors, const at::Tensor& columns) {
  const at::Tensor diff = columns.unsqueeze(0) - anchors.unsqueeze(1);
  const at::Tensor norm = at::linalg_vector_norm(diff, 2, {2}, /*keepdim=*/true);
  return {diff / norm.clamp_min(kNormEps), norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_angle_loss(const at::Tensor& es_r,
                                                               const at::Tensor& et_r,
                                                               const c10::optional<at::Tensor>& es_c_,
                                                               const c10::optional<at::Tensor>& et_c_,
                                                               bool grad_student,
                                                               int64_t anchors_per_group) {
  BelowAutograd below_autograd;
  check_rkd_angle_args(es_r, et_r, es_c_, et_c_, anchors_per_group);
  const bool rect = es_c_.has_value();
  const at::Tensor es_c = rect ? *es_c_ : es_r, et_c = rect ? *et_c_ : et_r;
  const int64_t n_r = es_r.size(0), n_c = es_c.size(0);
  const at::Tensor xs_r = es_r.contiguous(), xt_r = et_r.contiguous();
  const at::Tensor xs_c = es_c.contiguous(), xt_c = et_c.contiguous();
  at::Tensor grad_r = grad_student ? at::zeros_like(xs_r) : xs_r.new_empty({0});
  at::Tensor grad_c = grad_student && rect ? at::zeros_like(xs_c) : xs_r.new_empty({0});
  at::Tensor& grad_columns = rect ? grad_c : grad_r;
  at::Tensor loss = at::zeros({}, xs_r.options().dtype(at::kDouble));
  const int64_t group =
      anchors_per_group > 0
          ? anchors_per_group
          : group_within_budget(n_c, xs_r.size(1), xt_r.size(1), xs_r.element_size());
  for (int64_t a0 = 0; a0 < n_r; a0 += group) {
    const int64_t b = std::min(group, n_r - a0);
    const Units s = unit_differences(xs_r.narrow(0, a0, b), xs_c);
    const at::Tensor angles_t = [&] {
      const at::Tensor v = unit_differences(xt_r.narrow(0, a0, b), xt_c).unit;
      return at::bmm(v, v.transpose(1, 2));
    }();
    at::Tensor slopes = at::bmm(s.unit, s.unit.transpose(1, 2));  // psi_s, then h'
    loss += smooth_l1_sum(slopes, angles_t, grad_student);
    if (!grad_student) continue;
    const at::Tensor d_unit = 2 * at::bmm(slopes, s.unit);
    const at::Tensor along = (s.unit * d_unit).sum(2, /*keepdim=*/true);
    const at::Tensor d_diff = at::where(s.norm > kNormEps, (d_unit - s.unit * along) / s.norm,
                                        d_unit / kNormEps);
    grad_columns += d_diff.sum(0);
    grad_r.narrow(0, a0, b) -= d_diff.sum(1);
  }
  return {loss.to(xs_r.scalar_type()), grad_r, grad_c};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) { m.impl("rkd_angle_loss", &rkd_angle_loss); }

#ifdef RELKD_CUDA_ARCHS  // a build with CUDA kernels: the same ATen code on CUDA tensors
TORCH_LIBRARY_IMPL(relkd, CUDA, m) { m.impl("rkd_angle_loss", &rkd_angle_loss); }
#endif

}  // namespace relkd
