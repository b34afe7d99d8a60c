// relation_penalty on CPU: RAD's epilogue over its N x k mined relations,
// sum over the entries with indices >= 0 of phi(s - t) (SPEC §2: hinge
// max(0, d - margin), l2 d^2, l1 |d|) and how many there are, forward and
// backward in one serial loop each. Written with tensor ops it was about ten
// elementwise passes over N x k, each an OpenMP region at the sizes RAD
// mines (N k >= 32768), for work that takes one thread well under a
// millisecond.
#include "common.h"

namespace relkd {
namespace {

enum class Penalty { Hinge, L2, L1 };

Penalty penalty_of(c10::string_view metric) {
  if (metric == "hinge") return Penalty::Hinge;
  if (metric == "l2") return Penalty::L2;
  TORCH_CHECK_VALUE(metric == "l1", "metric must be 'hinge', 'l2' or 'l1', got '",
                    std::string(metric), "'");
  return Penalty::L1;
}

// phi(d) and phi'(d), with the subgradients of PyTorch's clamp (1 at the
// kink) and abs (0 at 0), so that the fused loss has the gradient of its
// tensor-op form.
template <typename T>
inline T phi(Penalty p, T d, T margin) {
  if (p == Penalty::L2) return d * d;
  if (p == Penalty::L1) return std::abs(d);
  return std::max(d - margin, T(0));
}

template <typename T>
inline T phi_slope(Penalty p, T d, T margin) {
  if (p == Penalty::L2) return 2 * d;
  if (p == Penalty::L1) return d > 0 ? T(1) : d < 0 ? T(-1) : T(0);
  return d - margin >= 0 ? T(1) : T(0);
}

std::tuple<at::Tensor, at::Tensor> relation_penalty_cpu(const at::Tensor& s_in,
                                                        const at::Tensor& t_in,
                                                        const at::Tensor& indices_in,
                                                        c10::string_view metric, double margin) {
  BelowAutograd below_autograd;
  check_relation_penalty_args(s_in, t_in, indices_in, margin);
  const Penalty p = penalty_of(metric);
  const auto s = s_in.contiguous(), t = t_in.contiguous(), indices = indices_in.contiguous();
  auto total = at::empty({}, s.options());
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "relation_penalty", [&] {
    const scalar_t* ps = s.data_ptr<scalar_t>();
    const scalar_t* pt = t.data_ptr<scalar_t>();
    const int64_t* pi = indices.data_ptr<int64_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    double sum = 0;
    for (int64_t e = 0; e < s.numel(); ++e) {
      if (pi[e] < 0) continue;
      sum += double(phi(p, ps[e] - pt[e], m));
      ++count;
    }
    total.fill_(static_cast<scalar_t>(sum));
  });
  return {total, at::scalar_tensor(count, indices.options())};
}

// d total / d s and d total / d t (= -d total / d s), times grad.
std::tuple<at::Tensor, at::Tensor> relation_penalty_backward_cpu(
    const at::Tensor& grad, const at::Tensor& s_in, const at::Tensor& t_in,
    const at::Tensor& indices_in, c10::string_view metric, double margin) {
  BelowAutograd below_autograd;
  check_relation_penalty_args(s_in, t_in, indices_in, margin);
  TORCH_CHECK_VALUE(grad.dim() == 0, "grad must be a scalar (0-D), got ", grad.dim(), "-D");
  check_same(grad, s_in, "grad", "s");
  const Penalty p = penalty_of(metric);
  const auto s = s_in.contiguous(), t = t_in.contiguous(), indices = indices_in.contiguous();
  auto grad_s = at::empty_like(s), grad_t = at::empty_like(s);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "relation_penalty_backward", [&] {
    const scalar_t g = grad.item<scalar_t>();
    const scalar_t* ps = s.data_ptr<scalar_t>();
    const scalar_t* pt = t.data_ptr<scalar_t>();
    const int64_t* pi = indices.data_ptr<int64_t>();
    scalar_t* gs = grad_s.data_ptr<scalar_t>();
    scalar_t* gt = grad_t.data_ptr<scalar_t>();
    const scalar_t m = static_cast<scalar_t>(margin);
    for (int64_t e = 0; e < s.numel(); ++e) {
      // Unmined entries get exactly zero, also where s or t is not finite.
      const scalar_t v = pi[e] < 0 ? scalar_t(0) : g * phi_slope(p, ps[e] - pt[e], m);
      gs[e] = v;
      gt[e] = -v;
    }
  });
  return {grad_s, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("relation_penalty", &relation_penalty_cpu);
  m.impl("relation_penalty_backward", &relation_penalty_backward_cpu);
}

}  // namespace relkd
