// pair_select on tensor cores: the histogram and candidate passes of EKD's
// order statistics (SPEC §3) with each sub-tile of similarities (SelectShape:
// 64 x 128, or 128 x 128 built with RELKD_SELECT_ROWS=128) computed in the
// kernel (pair_tile_mma.cuh: mma in the operand format the
// glue picks) and classified while in registers (pair_select.cuh), so no
// similarity tile reaches memory. Every pass computes a pair's value by the
// same instructions in the same order, so the histogram passes and the
// collection agree on every key, as the tile path's shared tiles ensure.
#include "pair_select.cuh"
#include "pair_tile_mma.cuh"

namespace relkd {
namespace cuda {
namespace {

// Whether entry (r, c) lies inside the view and is a pair of the mask.
__device__ inline bool counted(const TileView& view, const TileMask& mask, int64_t r, int64_t c) {
  return r < view.rows && c < view.cols && tile_weight(mask, view.r0 + r, view.c0 + c) != 0;
}

// The per-entry steps, not inlined (inlined into the kernels, their prefix
// loop and atomics made nvcc take minutes per unit).
__device__ __noinline__ void histogram_entry(float value, bool counted, const int64_t* prefixes,
                                             int64_t n_prefix, int shift, unsigned* hot,
                                             unsigned long long* hist) {
  add_to_histogram<float>(counted ? histogram_bin(value, prefixes, n_prefix, shift) : -1, hot,
                          hist);
}

__device__ __noinline__ void first_pass_entry(const TileView& view, const TileMask& mask,
                                              int64_t r, int64_t c, float value, bool counted,
                                              const FirstPassCollect<float>& collect) {
  collect_first_pass(mask, view.r0 + r, view.c0 + c, value, counted, collect);
}

__device__ __noinline__ void collect_entry(const TileView& view, const TileMask& mask,
                                           int64_t r, int64_t c, float value, bool counted,
                                           const CollectOutputs<float>& out, int64_t* tie_keys) {
  const int64_t tie =
      counted ? collect_pair(mask, view.r0 + r, view.c0 + c, value, out) : INT64_MAX;
  if (tie_keys && r < view.rows && c < view.cols) tie_keys[r * view.cols + c] = tie;
}

// The passes' sub-tiles: SelectShape (pair_tile_mma.cuh; by default MmaWide,
// as the top-k's: warps of 32 x 32, 16 FLOP per byte read from shared
// memory against 11 for 16 x 32), one accumulator set. Both passes must
// share it: a pair's value then comes from the same instructions in the
// same order in each.
constexpr size_t kSelectStageBytes = SelectShape::kStageEntries * sizeof(uint16_t);

// Column sub-tiles a histogram block sweeps along its rows, 1024 columns
// whatever the shape, so that its hot bins (pair_select.cuh, in dynamic
// shared memory after the staging) gather up to 64 (128) x 1024 pairs per
// global atomic.
constexpr int kHistogramStrip = 1024 / SelectShape::kCols;

// The blocks of a histogram pass: strips of SelectShape::kRows rows and
// kHistogramStrip sub-tiles.
int64_t histogram_mma_blocks(const TileView& view) {
  return blocks_for(view.rows, SelectShape::kRows) *
         blocks_for(blocks_for(view.cols, SelectShape::kCols), kHistogramStrip);
}

// The sub-tile's pairs in the accumulator layout: f(row, column, value)
// with row and column tile-local, in a rolled loop (acc read from the stack
// frame, 128 bytes, 256 for 128 x 128; L1), against minutes of nvcc per
// unrolled unit.
template <typename F>
__device__ inline void for_each_entry(const SelectShape::Acc& acc, int64_t tr, int64_t tc,
                                      const F& f) {
  for (int m = 0; m < SelectShape::kTilesM; ++m)
    for (int j = 0; j < SelectShape::kTilesN; ++j)
      for (int i = 0; i < 4; ++i)
        f(tr + SelectShape::entry_row(m, i), tc + SelectShape::entry_col(j, i),
          acc_tile(acc, m, j)[i]);
}

template <MmaOperands H>
__global__ void RELKD_SELECT_BOUNDS histogram_mma_kernel(MmaTileInputs in, TileView view, TileMask mask,
                                     const int64_t* prefixes, int64_t n_prefix, int shift,
                                     unsigned long long* hist, FirstPassCollect<float> collect) {
  uint16_t* stage = dynamic_shared<uint16_t>();  // kSelectStageBytes, then the hot bins
  unsigned* hot = first_pass<float>(shift)
                      ? reinterpret_cast<unsigned*>(stage + SelectShape::kStageEntries)
                      : nullptr;
  clear_hot_bins<float>(hot);
  const int64_t tiles_c = blocks_for(view.cols, SelectShape::kCols);
  const int64_t strips = blocks_for(tiles_c, kHistogramStrip);
  const int64_t tr = blockIdx.x / strips * SelectShape::kRows, strip = blockIdx.x % strips;
  const int64_t last = (strip + 1) * kHistogramStrip < tiles_c ? (strip + 1) * kHistogramStrip
                                                                : tiles_c;
  const bool collecting = collects(collect);
  for (int64_t t = strip * kHistogramStrip; t < last; ++t) {
    const int64_t tc = t * SelectShape::kCols;
    // No pair of the mask (the whole block skips it).
    if (below_diagonal<SelectShape::kCols>(view, mask, tr, tc)) continue;
    SelectShape::Acc acc = {};
    sub_tile_products<H, false, SelectShape>(entries<H>(in.xs_r), entries<H>(in.xs_c), in.ds,
                                             view, tr, tc, stage, acc);
    // Every thread makes every call: warp-wide steps inside.
    for_each_entry(acc, tr, tc, [&](int64_t r, int64_t c, float value) {
      const bool in_mask = counted(view, mask, r, c);
      histogram_entry(value, in_mask, prefixes, n_prefix, shift, hot, hist);
      if (collecting) first_pass_entry(view, mask, r, c, value, in_mask, collect);
    });
  }
  flush_hot_bins<float>(hot, hist);
}

template <MmaOperands H>
__global__ void RELKD_SELECT_BOUNDS collect_mma_kernel(MmaTileInputs in, TileView view, TileMask mask,
                                   CollectOutputs<float> out, int64_t* tie_keys) {
  uint16_t* stage = dynamic_shared<uint16_t>();  // kSelectStageBytes
  constexpr int kCols = SelectShape::kCols;
  int64_t tr, tc;
  SelectShape::block_sub_tile(view, &tr, &tc);
  if (below_diagonal<kCols>(view, mask, tr, tc)) {  // no pair of the mask: no ties either
    for (int e = threadIdx.x; tie_keys && e < SelectShape::kRows * kCols; e += kThreads) {
      const int64_t r = tr + e / kCols, c = tc + e % kCols;
      if (r < view.rows && c < view.cols) tie_keys[r * view.cols + c] = INT64_MAX;
    }
    return;
  }
  SelectShape::Acc acc = {};
  sub_tile_products<H, false, SelectShape>(entries<H>(in.xs_r), entries<H>(in.xs_c), in.ds, view,
                                           tr, tc, stage, acc);
  for_each_entry(acc, tr, tc, [&](int64_t r, int64_t c, float value) {
    collect_entry(view, mask, r, c, value, counted(view, mask, r, c), out, tie_keys);
  });
}

}  // namespace

int pair_histogram_mma(const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                       const int64_t* prefixes, int64_t n_prefix, int shift,
                       unsigned long long* hist, const FirstPassCollect<float>& collect,
                       Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  const size_t bytes = kSelectStageBytes +
                       (first_pass<float>(shift) ? HotBins<float>::kSlots * sizeof(unsigned) : 0);
  int status = 0;
  with_operands(in.operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    status = allow_dynamic_shared(histogram_mma_kernel<H>, bytes);
    if (status != 0) return;
    RELKD_LAUNCH_SHARED(histogram_mma_blocks(view), kThreads, bytes, stream,
                        histogram_mma_kernel<H>)(in, view, mask, prefixes, n_prefix, shift, hist,
                                                 collect);
    status = launched();
  });
  return status;
}

int pair_collect_mma(const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                     uint64_t tau, float* above_v, int64_t* above_i, int64_t* above_j,
                     int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                     unsigned long long* tie_count, Stream stream) {
  const CollectOutputs<float> out{tau,       above_v,     above_i,  above_j,
                                  above_cap, above_count, tie_count};
  if (view.rows * view.cols == 0) return 0;
  int status = 0;
  with_operands(in.operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    status = allow_dynamic_shared(collect_mma_kernel<H>, kSelectStageBytes);
    if (status != 0) return;
    RELKD_LAUNCH_SHARED(SelectShape::blocks(view), kThreads, kSelectStageBytes, stream,
                        collect_mma_kernel<H>)(in, view, mask, out, tie_keys);
    status = launched();
  });
  return status;
}

}  // namespace cuda
}  // namespace relkd
