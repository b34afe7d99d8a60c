// The pairwise_loss tile on tensor cores: each thread block computes a 64 x 64
// sub-tile of the student's (and teacher's) similarities with bf16
// mma.m16n8k16 (fp32 accumulation) and runs the kind's pair terms on the
// accumulators while they are in registers, so the similarities never reach
// memory; only the derivative tiles the gradient products need are written.
// float32 embeddings are rounded to bfloat16 as they are staged in shared
// memory. csrc/cuda/pair_tile_<kind>.cu instantiate it, one unit per kind.
#pragma once

#include "mma.cuh"
#include "pair_tile.cuh"

namespace relkd {
namespace cuda {

constexpr int kMmaEdge = 64;               // rows and columns of a block's sub-tile
constexpr int kMmaDepth = 32;              // embedding entries staged per step
constexpr int kMmaStride = kMmaDepth + 8;  // a staged row; the pad spreads fragment reads
                                           // over the shared-memory banks
constexpr int kMmaWarpRows = 16, kMmaWarpCols = 32;  // 8 warps: 4 x 2 of these
static_assert(kThreads == 256 && (kMmaEdge / kMmaWarpRows) * (kMmaEdge / kMmaWarpCols) == 8,
              "the warp grid covers the sub-tile with kThreads threads");

// Rows row0 .. row0 + 64 (those below `end`) and entries k0 .. k0 + 32 (those
// below d) of x (rows of d entries), as bf16 into stage[64][kMmaStride];
// the rest of the stage is 0, so it adds nothing to the products.
__device__ inline void stage_rows(const float* x, int64_t end, int64_t d, int64_t row0,
                                  int64_t k0, uint16_t* stage) {
  for (int e = threadIdx.x; e < kMmaEdge * kMmaDepth; e += kThreads) {
    const int r = e / kMmaDepth, k = e % kMmaDepth;
    const int64_t p = row0 + r, kk = k0 + k;
    stage[r * kMmaStride + k] = (p < end && kk < d) ? bf16_bits(x[p * d + kk]) : uint16_t(0);
  }
}

// acc[j] += (the warp's 16 staged rows) x (its columns j*8 .. j*8 + 8)^T over
// `Depth` staged entries (rows and columns `Stride` entries apart).
template <int Depth = kMmaDepth, int Stride = kMmaStride>
__device__ inline void warp_products(const uint16_t* rows, const uint16_t* cols, int warp_row,
                                     int warp_col, float (&acc)[4][4]) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int k = 0; k < Depth; k += 16) {
    const uint16_t* a0 = rows + (warp_row + g) * Stride + k + 2 * t;
    const uint16_t* a8 = a0 + 8 * Stride;
    const uint32_t a[4] = {fragment_pair(a0), fragment_pair(a8), fragment_pair(a0 + 8),
                           fragment_pair(a8 + 8)};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint16_t* b0 = cols + (warp_col + j * 8 + g) * Stride + k + 2 * t;
      const uint32_t b[2] = {fragment_pair(b0), fragment_pair(b0 + 8)};
      mma_bf16_16816(acc[j], a, b);
    }
  }
}

// The sub-tile at (tr, tc) of the view of x_r x_c^T (d entries per row) into
// acc, the warp's 16 x 32 share. `stage` holds two staged blocks.
__device__ inline void sub_tile_products(const float* x_r, const float* x_c, int64_t d,
                                         const TileView& view, int64_t tr, int64_t tc,
                                         uint16_t* stage, float (&acc)[4][4]) {
  const int warp = threadIdx.x / 32;
  const int warp_row = warp % 4 * kMmaWarpRows, warp_col = warp / 4 * kMmaWarpCols;
  uint16_t* rows = stage;
  uint16_t* cols = stage + kMmaEdge * kMmaStride;
  for (int64_t k0 = 0; k0 < d; k0 += kMmaDepth) {
    stage_rows(x_r, view.r0 + view.rows, d, view.r0 + tr, k0, rows);
    stage_rows(x_c, view.c0 + view.cols, d, view.c0 + tc, k0, cols);
    __syncthreads();
    warp_products(rows, cols, warp_row, warp_col, acc);
    __syncthreads();  // the next step overwrites the stage
  }
}

// pair_at, not inlined: the kernel's unrolled loop over its accumulators
// keeps them in registers, and the kind's terms are compiled once.
template <typename Terms>
__device__ __noinline__ PairSums pair_epilogue(const Terms& terms, const PairTileArgs<float>& a,
                                               const TileView& view, const TileMask& mask,
                                               int64_t r, int64_t c, float s, float t) {
  return pair_at(terms, a, view, mask, r, c, s, t);
}

// True when every pair of the sub-tile at (tr, tc) lies below the diagonal
// of a symmetric op (column < row), where the pair weight is 0: half the
// sub-tiles of a diagonal tile.
__device__ inline bool below_diagonal(const TileView& view, const TileMask& mask, int64_t tr,
                                      int64_t tc) {
  const int64_t end = tc + kMmaEdge < view.cols ? tc + kMmaEdge : view.cols;
  const int64_t last_col = view.c0 + end - 1;
  return mask.symmetric && last_col < view.r0 + tr;
}

// The sub-tile's derivative tiles, all 0 (the gradient products read them).
__device__ inline void zero_sub_tile(const PairTileArgs<float>& a, const TileView& view,
                                     int64_t tr, int64_t tc) {
  for (int e = threadIdx.x; e < kMmaEdge * kMmaEdge; e += kThreads) {
    const int64_t r = tr + e / kMmaEdge, c = tc + e % kMmaEdge;
    if (r >= view.rows || c >= view.cols) continue;
    const int64_t at = r * view.ld + c;
    if (a.grad_s) a.s[at] = 0.0f;
    if (a.grad_t) a.t[at] = 0.0f;
    if (a.dn) a.dn[at] = 0.0f;
  }
}

template <typename Terms>
__global__ void pair_tile_mma_kernel(Terms terms, PairTileArgs<float> a, MmaTileInputs in,
                                     TileView view, TileMask mask) {
  __shared__ uint16_t stage[2 * kMmaEdge * kMmaStride];
  __shared__ double shared[kThreads];
  const int64_t blocks_c = (view.cols + kMmaEdge - 1) / kMmaEdge;
  const int64_t tr = blockIdx.x / blocks_c * kMmaEdge, tc = blockIdx.x % blocks_c * kMmaEdge;
  if (below_diagonal(view, mask, tr, tc)) {  // the whole block leaves together
    zero_sub_tile(a, view, tr, tc);
    if (threadIdx.x < 3) a.sums[blockIdx.x * 3 + threadIdx.x] = 0.0;
    return;
  }
  float s[4][4] = {}, t[4][4] = {};
  sub_tile_products(in.xs_r, in.xs_c, in.ds, view, tr, tc, stage, s);
  if (in.xt_r) sub_tile_products(in.xt_r, in.xt_c, in.dt, view, tr, tc, stage, t);

  const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, q = threadIdx.x % 4;
  const int64_t row0 = tr + warp % 4 * kMmaWarpRows, col0 = tc + warp / 4 * kMmaWarpCols;
  PairSums sums;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)  // the accumulator layout of mma.cuh
      sums.add(pair_epilogue(terms, a, view, mask, row0 + g + 8 * (i / 2),
                             col0 + j * 8 + 2 * q + i % 2, s[j][i], t[j][i]));
  store_block_sums(sums, shared, a.sums);
}

template <typename Terms>
int launch_pair_tile_mma(const Terms& terms, const PairTileArgs<float>& args,
                         const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                         Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  RELKD_LAUNCH(pair_tile_mma_blocks(view), kThreads, stream, pair_tile_mma_kernel<Terms>)(
      terms, args, in, view, mask);
  return launched();
}

// One launcher per kind, defined in csrc/cuda/pair_tile_<kind>.cu.
int pair_tile_mma_cckd(const PairTileArgs<float>&, const MmaTileInputs&, const TileView&,
                       const TileMask&, Stream);
int pair_tile_mma_ekd_pos(const PairTileArgs<float>&, const MmaTileInputs&, const TileView&,
                          const TileMask&, Stream);
int pair_tile_mma_rkd(const PairTileArgs<float>&, const MmaTileInputs&, const TileView&,
                      const TileMask&, Stream);

}  // namespace cuda
}  // namespace relkd
