// pair_select on CUDA (histograms and candidate collection of EKD's exact
// order statistics), the dispatch of pairwise_loss tiles (float32/64 and
// tensor-core) and rows passes to their kind's unit, the tensor-core
// capability checks, and the fixed-order reduction of per-block partial sums.
#include "pair_rows_mma.cuh"
#include "pair_select.cuh"

namespace relkd {
namespace cuda {
namespace {

// Tile elements a histogram block sweeps: kHistogramStrip times those of a
// pair_tile block, so that its hot bins (pair_select.cuh) gather more pairs
// per global atomic.
constexpr int kHistogramStrip = 16;
constexpr int64_t kHistogramBlockElements = kPairBlockElements * kHistogramStrip;

template <typename T>
__global__ void histogram_kernel(const T* s, TileView view, TileMask mask,
                                 const int64_t* prefixes, int64_t n_prefix, int shift,
                                 unsigned long long* hist, FirstPassCollect<T> collect) {
  __shared__ unsigned hot_counts[HotBins<T>::kSlots];
  unsigned* hot = first_pass<T>(shift) ? hot_counts : nullptr;
  clear_hot_bins<T>(hot);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kHistogramBlockElements;
  const int64_t count = view.rows * view.cols;
  const bool collecting = collects(collect);
  for (int u = 0; u < kPairItems * kHistogramStrip; ++u) {
    if (first + u * kThreads >= count) break;  // the same for the whole block: warps converged
    const int64_t e = first + u * kThreads + threadIdx.x;
    int64_t p = 0, q = 0;
    bool counted = false;
    T value = 0;
    if (e < count) {
      const int64_t r = e / view.cols, c = e % view.cols;
      p = view.r0 + r;
      q = view.c0 + c;
      counted = tile_weight(mask, p, q) != 0;
      if (counted) value = s[r * view.ld + c];
    }
    add_to_histogram<T>(counted ? histogram_bin(value, prefixes, n_prefix, shift) : -1, hot,
                        hist);
    if (collecting) collect_first_pass(mask, p, q, value, counted, collect);
  }
  flush_hot_bins<T>(hot, hist);
}

template <typename T>
__global__ void collect_kernel(const T* s, TileView view, TileMask mask, CollectOutputs<T> out,
                               int64_t* tie_keys) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kPairBlockElements;
  const int64_t count = view.rows * view.cols;
  for (int u = 0; u < kPairItems; ++u) {
    const int64_t e = first + u * kThreads + threadIdx.x;
    if (e >= count) break;
    const int64_t r = e / view.cols, c = e % view.cols, p = view.r0 + r, q = view.c0 + c;
    int64_t tie = INT64_MAX;
    if (tile_weight(mask, p, q) != 0) tie = collect_pair(mask, p, q, s[r * view.ld + c], out);
    if (tie_keys) tie_keys[e] = tie;
  }
}

__global__ void sum_partials_kernel(const double* partials, int64_t parts, double* out) {
  __shared__ double shared[kThreads];
  for (int which = 0; which < 3; ++which) {
    double acc = 0;
    for (int64_t p = threadIdx.x; p < parts; p += kThreads) acc += partials[p * 3 + which];
    acc = block_sum(acc, shared);
    if (threadIdx.x == 0) out[which] = acc;
  }
}

template <typename T>
int histogram(const T* s, const TileView& view, const TileMask& mask, const int64_t* prefixes,
              int64_t n_prefix, int shift, unsigned long long* hist,
              const FirstPassCollect<T>& collect, Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  RELKD_LAUNCH(blocks_for(view.rows * view.cols, kHistogramBlockElements), kThreads, stream,
               histogram_kernel<T>)(s, view, mask, prefixes, n_prefix, shift, hist, collect);
  return launched();
}

template <typename T>
int collect(const T* s, const TileView& view, const TileMask& mask, uint64_t tau, T* above_v,
            int64_t* above_i, int64_t* above_j, int64_t above_cap,
            unsigned long long* above_count, int64_t* tie_keys, unsigned long long* tie_count,
            Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  const CollectOutputs<T> out{tau, above_v, above_i, above_j, above_cap, above_count, tie_count};
  RELKD_LAUNCH(pair_tile_blocks(view), kThreads, stream, collect_kernel<T>)(s, view, mask, out,
                                                                           tie_keys);
  return launched();
}

template <typename T>
int dispatch_pair_tile(const PairTileArgs<T>& a, const TileView& v, const TileMask& m,
                       Stream s) {
  switch (a.kind) {
    case PairKind::Cckd: return pair_tile_cckd(a, v, m, s);
    case PairKind::EkdPos: return pair_tile_ekd_pos(a, v, m, s);
    case PairKind::RkdDistSum:
    case PairKind::RkdDistance: return pair_tile_rkd(a, v, m, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

bool has_tensor_cores(int device) {
#ifdef RELKD_EMULATE
  (void)device;
  return true;  // the emulation's mma
#else
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         major >= 8;
#endif
}

bool rows_mma_fits(int device, int64_t ds, MmaOperands operands) {
  const size_t need = rows_mma_dynamic_bytes(ds) + rows_shared_bytes(operands);
  // Emulated: about an A100's opt-in limit.
  return has_tensor_cores(device) && shared_memory_fits(device, need, 160u << 10);
}

int64_t pair_rows_mma_blocks(int64_t n) { return blocks_for(n, kMmaEdge); }

int pair_rows_mma(const RowsMmaArgs& a, const TileMask& m, Stream s) {
  switch (a.kind) {
    case PairKind::Cckd: return pair_rows_mma_cckd(a, m, s);
    case PairKind::EkdPos: return pair_rows_mma_ekd_pos(a, m, s);
    case PairKind::RkdDistSum:
    case PairKind::RkdDistance: return pair_rows_mma_rkd(a, m, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t pair_tile_mma_blocks(const TileView& view) { return MmaSquare::blocks(view); }

int pair_tile_mma(const PairTileArgs<float>& a, const MmaTileInputs& in, const TileView& v,
                  const TileMask& m, Stream s) {
  switch (a.kind) {
    case PairKind::Cckd: return pair_tile_mma_cckd(a, in, v, m, s);
    case PairKind::EkdPos: return pair_tile_mma_ekd_pos(a, in, v, m, s);
    case PairKind::RkdDistSum:
    case PairKind::RkdDistance: return pair_tile_mma_rkd(a, in, v, m, s);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t pair_tile_blocks(const TileView& view) {
  return blocks_for(view.rows * view.cols, kPairBlockElements);
}

int pair_tile(const PairTileArgs<float>& a, const TileView& v, const TileMask& m, Stream s) {
  return dispatch_pair_tile(a, v, m, s);
}
int pair_tile(const PairTileArgs<double>& a, const TileView& v, const TileMask& m, Stream s) {
  return dispatch_pair_tile(a, v, m, s);
}

int sum_partials(const double* partials, int64_t parts, double* out, Stream stream) {
  RELKD_LAUNCH(1, kThreads, stream, sum_partials_kernel)(partials, parts, out);
  return launched();
}

int pair_histogram_tile(const float* s, const TileView& view, const TileMask& mask,
                        const int64_t* prefixes, int64_t n_prefix, int shift,
                        unsigned long long* hist, const FirstPassCollect<float>& collect,
                        Stream stream) {
  return histogram(s, view, mask, prefixes, n_prefix, shift, hist, collect, stream);
}
int pair_histogram_tile(const double* s, const TileView& view, const TileMask& mask,
                        const int64_t* prefixes, int64_t n_prefix, int shift,
                        unsigned long long* hist, const FirstPassCollect<double>& collect,
                        Stream stream) {
  return histogram(s, view, mask, prefixes, n_prefix, shift, hist, collect, stream);
}

int pair_collect_tile(const float* s, const TileView& view, const TileMask& mask,
                      uint64_t tau, float* above_v, int64_t* above_i, int64_t* above_j,
                      int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                      unsigned long long* tie_count, Stream stream) {
  return collect(s, view, mask, tau, above_v, above_i, above_j, above_cap, above_count, tie_keys,
                 tie_count, stream);
}
int pair_collect_tile(const double* s, const TileView& view, const TileMask& mask,
                      uint64_t tau, double* above_v, int64_t* above_i, int64_t* above_j,
                      int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                      unsigned long long* tie_count, Stream stream) {
  return collect(s, view, mask, tau, above_v, above_i, above_j, above_cap, above_count, tie_keys,
                 tie_count, stream);
}

}  // namespace cuda
}  // namespace relkd
