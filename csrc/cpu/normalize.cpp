// Row L2 normalisation y_i = x_i / max(|x_i|, eps) (F.normalize's formula)
// and its backward, each one parallel region over row chunks. Every loss
// normalises its embeddings; as PyTorch ops that is about a dozen
// elementwise ops and reductions over N x D, each an OpenMP region, and each
// region leaves libgomp's worker spinning for milliseconds afterwards, CPU
// time a busy machine's other processes (data loaders) need.
#include "common.h"

namespace relkd {
namespace {

// Rows per work item: about 16K elements, so the rows of an item stay in L1/L2.
int64_t rows_per_chunk(int64_t d) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, d));
}

void check_rows(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                    op, ": ", name, " must be a 2-D float32/float64 tensor, got ", x.scalar_type(),
                    " ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": CPU tensors expected, got ", x.device());
}

// A finite row whose norm overflows its dtype (float64 entries beyond about
// 1e154, float32 ones near 3e38): y from the row scaled by a power of two
// (exact), so that it is the unit row instead of x / inf = 0. False for a
// row holding inf or NaN, which takes the plain formula (NaN, as F.normalize).
template <typename scalar_t>
bool normalize_huge_row(const scalar_t* x, scalar_t* y, int64_t d, scalar_t* norm) {
  double big = 0;
  for (int64_t c = 0; c < d; ++c) big = std::max(big, std::abs(double(x[c])));
  if (!std::isfinite(big)) return false;
  const int e = std::ilogb(big);
  double sum = 0;
  for (int64_t c = 0; c < d; ++c) {
    const double v = std::ldexp(double(x[c]), -e);
    sum += v * v;
  }
  const double r = std::sqrt(sum);  // in [1, sqrt(d) * 2)
  for (int64_t c = 0; c < d; ++c) y[c] = scalar_t(std::ldexp(double(x[c]), -e) / r);
  *norm = scalar_t(std::ldexp(r, e));  // inf beyond the dtype: its gradient is ~0
  return true;
}

// (y, norm): y = x / max(norm, eps) row by row, norm = |x_i| (unclamped, in x's dtype).
std::tuple<at::Tensor, at::Tensor> normalize_rows_cpu(const at::Tensor& x_in, double eps) {
  check_rows(x_in, "x", "normalize_rows");
  TORCH_CHECK_VALUE(eps > 0, "normalize_rows: eps must be positive, got ", eps);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor y = at::empty_like(x), norm = at::empty({n}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "normalize_rows", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    scalar_t* pn = norm.data_ptr<scalar_t>();
    parallel_chunks(n, rows_per_chunk(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t* xi = px + i * d;
        const scalar_t r = scalar_t(std::sqrt(lane_dot<double>(xi, xi, d)));
        if (std::isinf(r) && normalize_huge_row(xi, py + i * d, d, pn + i)) continue;
        const scalar_t m = r < scalar_t(eps) ? scalar_t(eps) : r;  // NaN stays NaN
        for (int64_t c = 0; c < d; ++c) py[i * d + c] = xi[c] / m;
        pn[i] = r;
      }
    });
  });
  return {y, norm};
}

// d/dx of sum(grad * y): (g - y (y.g)) / |x| where |x| >= eps (NaN included),
// g / eps where the norm was clamped (the clamp's gradient is zero there).
at::Tensor normalize_rows_backward_cpu(const at::Tensor& grad_in, const at::Tensor& y_in,
                                       const at::Tensor& norm_in, double eps) {
  check_rows(grad_in, "grad", "normalize_rows_backward");
  check_rows(y_in, "y", "normalize_rows_backward");
  TORCH_CHECK_VALUE(grad_in.sizes() == y_in.sizes() && grad_in.scalar_type() == y_in.scalar_type(),
                    "normalize_rows_backward: grad and y must match, got ", grad_in.sizes(), " ",
                    grad_in.scalar_type(), " and ", y_in.sizes(), " ", y_in.scalar_type());
  TORCH_CHECK_VALUE(norm_in.dim() == 1 && norm_in.size(0) == y_in.size(0) &&
                        norm_in.scalar_type() == y_in.scalar_type() && norm_in.device().is_cpu(),
                    "normalize_rows_backward: norm must be a CPU vector of y's rows and dtype, got ",
                    norm_in.scalar_type(), " ", norm_in.sizes());
  const at::Tensor g = grad_in.contiguous(), y = y_in.contiguous(), norm = norm_in.contiguous();
  const int64_t n = y.size(0), d = y.size(1);
  at::Tensor gx = at::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "normalize_rows_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>(),
                   *pn = norm.data_ptr<scalar_t>();
    scalar_t* out = gx.data_ptr<scalar_t>();
    parallel_chunks(n, rows_per_chunk(d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t *gi = pg + i * d, *yi = py + i * d;
        scalar_t* oi = out + i * d;
        if (pn[i] < scalar_t(eps)) {
          for (int64_t c = 0; c < d; ++c) oi[c] = gi[c] / scalar_t(eps);
          continue;
        }
        const scalar_t dot = scalar_t(lane_dot<double>(yi, gi, d));
        for (int64_t c = 0; c < d; ++c) oi[c] = (gi[c] - yi[c] * dot) / pn[i];
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("normalize_rows", &normalize_rows_cpu);
  m.impl("normalize_rows_backward", &normalize_rows_backward_cpu);
}

}  // namespace relkd
