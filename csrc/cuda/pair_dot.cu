// pair_dot on CUDA: out[i, s] = a_i . b_{idx[i, s]} (0 at idx -1), one warp
// per output; its backward by rows (grad_a) and by columns through the
// inverse index the glue builds (grad_b): every sum runs in a fixed order,
// so results are bitwise reproducible (no atomics).
#include "common.cuh"

namespace relkd {
namespace cuda {
namespace {

constexpr int kWarp = 32;

template <typename T>
__global__ void forward_kernel(const T* a, const T* b, const int64_t* idx, int64_t n, int64_t k,
                               int64_t d, T* out) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= n * k) return;
  const int64_t i = pair / k, j = idx[pair];
  T acc = 0;
  if (j >= 0)
    for (int64_t e = lane; e < d; e += kWarp) acc += a[i * d + e] * b[j * d + e];
  for (int offset = kWarp / 2; offset > 0; offset >>= 1)
    acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[pair] = acc;
}

template <typename T>
__global__ void grad_rows_kernel(const T* grad, const T* b, const int64_t* idx, int64_t n,
                                 int64_t k, int64_t d, T* grad_a) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n * d) return;
  const int64_t i = e / d, col = e % d;
  T acc = 0;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t j = idx[i * k + s];
    if (j >= 0) acc += grad[i * k + s] * b[j * d + col];
  }
  grad_a[e] = acc;
}

template <typename T>
__global__ void grad_columns_kernel(const T* grad, const T* a, const int64_t* entries,
                                    const int64_t* start, int64_t m, int64_t k, int64_t d,
                                    T* grad_b) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= m * d) return;
  const int64_t j = e / d, col = e % d;
  T acc = 0;
  for (int64_t p = start[j]; p < start[j + 1]; ++p) {
    const int64_t flat = entries[p];
    acc += grad[flat] * a[(flat / k) * d + col];
  }
  grad_b[e] = acc;
}

template <typename T>
int forward(const T* a, const T* b, const int64_t* idx, int64_t n, int64_t k, int64_t d, T* out,
            Stream stream) {
  if (n * k == 0) return 0;
  const int64_t blocks = blocks_for(n * k * kWarp, kThreads);
  RELKD_LAUNCH(blocks, kThreads, stream, forward_kernel<T>)(a, b, idx, n, k, d, out);
  return launched();
}

template <typename T>
int grad_rows(const T* grad, const T* b, const int64_t* idx, int64_t n, int64_t k, int64_t d,
              T* grad_a, Stream stream) {
  if (n * d == 0) return 0;
  RELKD_LAUNCH(blocks_for(n * d, kThreads), kThreads, stream, grad_rows_kernel<T>)(
      grad, b, idx, n, k, d, grad_a);
  return launched();
}

template <typename T>
int grad_columns(const T* grad, const T* a, const int64_t* entries, const int64_t* start,
                 int64_t m, int64_t k, int64_t d, T* grad_b, Stream stream) {
  if (m * d == 0) return 0;
  RELKD_LAUNCH(blocks_for(m * d, kThreads), kThreads, stream, grad_columns_kernel<T>)(
      grad, a, entries, start, m, k, d, grad_b);
  return launched();
}

}  // namespace

int pair_dot_forward(const float* a, const float* b, const int64_t* idx, int64_t n, int64_t k,
                     int64_t d, float* out, Stream stream) {
  return forward(a, b, idx, n, k, d, out, stream);
}
int pair_dot_forward(const double* a, const double* b, const int64_t* idx, int64_t n,
                     int64_t k, int64_t d, double* out, Stream stream) {
  return forward(a, b, idx, n, k, d, out, stream);
}
int pair_dot_grad_rows(const float* grad, const float* b, const int64_t* idx, int64_t n,
                       int64_t k, int64_t d, float* grad_a, Stream stream) {
  return grad_rows(grad, b, idx, n, k, d, grad_a, stream);
}
int pair_dot_grad_rows(const double* grad, const double* b, const int64_t* idx, int64_t n,
                       int64_t k, int64_t d, double* grad_a, Stream stream) {
  return grad_rows(grad, b, idx, n, k, d, grad_a, stream);
}
int pair_dot_grad_columns(const float* grad, const float* a, const int64_t* entries,
                          const int64_t* start, int64_t m, int64_t k, int64_t d, float* grad_b,
                          Stream stream) {
  return grad_columns(grad, a, entries, start, m, k, d, grad_b, stream);
}
int pair_dot_grad_columns(const double* grad, const double* a, const int64_t* entries,
                          const int64_t* start, int64_t m, int64_t k, int64_t d,
                          double* grad_b, Stream stream) {
  return grad_columns(grad, a, entries, start, m, k, d, grad_b, stream);
}

}  // namespace cuda
}  // namespace relkd
