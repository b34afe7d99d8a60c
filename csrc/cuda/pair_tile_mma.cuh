// The pairwise_loss tile on tensor cores: each thread block computes a 64 x 64
// sub-tile of the student's (and teacher's) similarities with mma (bf16,
// fp16, TF32 or 3xTF32 operands, MmaOperands; fp32 accumulation) and
// runs the kind's pair terms on the accumulators while they are in
// registers, so the similarities never reach memory; only the derivative
// tiles the gradient products need are written. The embeddings come stored
// in the operand format (mma.cuh: OperandEntry) and are copied to shared
// memory as they are, by cp.async (TF32 is rounded in the fragments).
// csrc/cuda/pair_tile_<kind>.cu instantiate it, one unit per kind.
#pragma once

#include "mma.cuh"
#include "pair_tile.cuh"

namespace relkd {
namespace cuda {

constexpr int kMmaEdge = 64;  // rows and columns of a block's sub-tile
// The staging's two tuning constants, RELKD_MMA_DEPTH and RELKD_MMA_STAGES
// at build time (setup.py passes them from the environment; gpu_check.sh's
// stage `tune` benchmarks a few pairs). cuda::mma_tiling reports them.
#ifndef RELKD_MMA_DEPTH
#define RELKD_MMA_DEPTH 64
#endif
#ifndef RELKD_MMA_STAGES
#define RELKD_MMA_STAGES 2
#endif

// Staging units (mma.cuh) per step: 64 16-bit embedding entries, or 32 TF32
// ones, between two barriers (16 mma per warp). A multiple of 32; 32 halves
// the shared memory and doubles the barriers (the GPU run decides).
constexpr int kMmaDepth = RELKD_MMA_DEPTH;
constexpr int kMmaStride = kMmaDepth + 8;  // a staged row; the pad spreads fragment reads
                                           // over the shared-memory banks
// Steps staged at once: the one being multiplied and kStages - 1 landing
// meanwhile (cp.async). 18 KiB each at depth 64 (rows and columns), in
// dynamic shared memory in every kernel (static shared memory stops at 48
// KiB), so that 3 or 4 need no other change.
constexpr int kStages = RELKD_MMA_STAGES;
static_assert(kStages >= 2, "one step multiplied while the next lands");

// A block's sub-tile: Rows x Cols, covered by the 8 warps in a grid of
// Rows / WarpRows down and Cols / WarpCols across, each warp WarpRows x
// WarpCols (kTilesM x kTilesN mma tiles of 16 x 8; Acc, the accumulators,
// 4 floats per tile and thread). A larger warp tile reads fewer bytes of
// shared memory per mma: 16 x 32 takes 3 ldmatrix per 4 mma (about 11 FLOP
// per byte read), 32 x 32 4 per 8 (16 FLOP per byte).
// The staging ring: kStages buffers of the columns, then kStages of the
// rows (kernels with resident rows need only the columns').
template <int Rows, int Cols, int WarpRows, int WarpCols>
struct MmaShape {
  static constexpr int kRows = Rows, kCols = Cols;
  static constexpr int kWarpsDown = Rows / WarpRows;
  static constexpr int kTilesM = WarpRows / 16, kTilesN = WarpCols / 8;
  static_assert(kWarpsDown * (Cols / WarpCols) * 32 == kThreads && kTilesN % 2 == 0 &&
                    Rows % 64 == 0 && Cols % 64 == 0,
                "8 warps cover the sub-tile; B fragments come in pairs; whole staging steps");
  using Acc = std::conditional_t<kTilesM == 1, float[kTilesN][4], float[kTilesM][kTilesN][4]>;
  static constexpr int kColumnBufferEntries = Cols * kMmaStride;  // one step
  static constexpr int kRowBufferEntries = Rows * kMmaStride;
  static constexpr int kColumnStageEntries = kStages * kColumnBufferEntries;
  static constexpr int kStageEntries = kColumnStageEntries + kStages * kRowBufferEntries;
  // This warp's corner in the sub-tile.
  __device__ static int warp_row() { return threadIdx.x / 32 % kWarpsDown * WarpRows; }
  __device__ static int warp_col() { return threadIdx.x / 32 / kWarpsDown * WarpCols; }
  // Where this thread's accumulator entry i of tile (m, j) lies in the
  // sub-tile (the accumulator layout of mma.cuh): its row and column.
  __device__ static int entry_row(int m, int i) {
    return warp_row() + m * 16 + threadIdx.x % 32 / 4 + 8 * (i / 2);
  }
  __device__ static int entry_col(int j, int i) {
    return warp_col() + j * 8 + 2 * (threadIdx.x % 4) + i % 2;
  }
  // The blocks of a view, one per sub-tile, row-major; this block's corner.
  __host__ __device__ static int64_t blocks(const TileView& view) {
    return blocks_for(view.rows, Rows) * blocks_for(view.cols, Cols);
  }
  __device__ static void block_sub_tile(const TileView& view, int64_t* tr, int64_t* tc) {
    const int64_t across = blocks_for(view.cols, Cols);
    *tr = blockIdx.x / across * Rows;
    *tc = blockIdx.x % across * Cols;
  }
};

// The pairwise tiles' sub-tile (their epilogue holds a student's and a
// teacher's accumulators beside its pair terms: 32 floats at 16 x 32) and
// the shape of the rows pass's G x X chunks: 64 x 64, warps of 16 x 32.
constexpr int kMmaWarpRows = 16, kMmaWarpCols = 32;
using MmaSquare = MmaShape<kMmaEdge, kMmaEdge, kMmaWarpRows, kMmaWarpCols>;
constexpr size_t kStageBytes = MmaSquare::kStageEntries * sizeof(uint16_t);  // the tiles' ring

// The sub-tile of the kernels that hold one set of accumulators per
// thread beside their epilogue (the top-k, the selection's passes, the rows
// pass's student and teacher similarities): 64 x 128 with warps of 32 x 32
// (4 ldmatrix per 8 mma, where 16 x 32 takes 3 per 4), or, built with
// RELKD_MMA_WIDE=0, the square one, so that a GPU run can compare them
// (gpu_check.sh's stage `tune`). cuda::mma_tiling reports which.
#ifndef RELKD_MMA_WIDE
#define RELKD_MMA_WIDE 1
#endif
using MmaWide =
    std::conditional_t<RELKD_MMA_WIDE != 0, MmaShape<kMmaEdge, 2 * kMmaEdge, 32, 32>, MmaSquare>;

// EKD's selection passes' sub-tile: MmaWide, or, built with
// RELKD_SELECT_ROWS=128, 128 x 128 with warps of 32 x 64. That stages
// 256 rows per 128 x 128 products where 64 x 128 stages 192 per 64 x 128
// (64 FLOP per byte from L2 for bf16 against 43) and reads 6 ldmatrix per
// 16 mma (21 FLOP per byte from shared memory against 16), but holds 64
// accumulators per thread: bounded to 128 registers (RELKD_SELECT_BOUNDS)
// for two blocks per multiprocessor (8-40 bytes spilled in the TF32
// forms), where the 64-row shape's 72-82 registers let three share it
// (unbounded: a bound of one block lets ptxas take 90-111). Which wins is
// for a GPU run to say (gpu_check.sh's stage `tune`, variant "-tall").
// cuda::mma_tiling reports the shape compiled.
#ifndef RELKD_SELECT_ROWS
#define RELKD_SELECT_ROWS 64
#endif
static_assert(RELKD_SELECT_ROWS == 64 || RELKD_SELECT_ROWS == 128, "RELKD_SELECT_ROWS: 64 or 128");
using SelectShape = std::conditional_t<RELKD_SELECT_ROWS == 128,
                                       MmaShape<2 * kMmaEdge, 2 * kMmaEdge, 32, 64>, MmaWide>;
#if RELKD_SELECT_ROWS == 128
#define RELKD_SELECT_BOUNDS __launch_bounds__(kThreads, 2)
#else
#define RELKD_SELECT_BOUNDS
#endif

// Where this thread's accumulator entry acc[j][i] lies in its block's
// 64 x 64 sub-tile (MmaSquare's warps hold one row of mma tiles).
__device__ inline int entry_row(int i) { return MmaSquare::entry_row(0, i); }
__device__ inline int entry_col(int j, int i) { return MmaSquare::entry_col(j, i); }

// 16 bytes of a staged row: 8 entries of a 16-bit format, or 4 TF32 entries.
struct alignas(16) StagePiece {
  uint32_t bits[4];
};

// A thread's share of one staging step of one operand, Rows x Units (a
// multiple of 64 rows; Units 16-bit units, a multiple of 32): kPieces
// pieces of 16 bytes, consecutive threads along a row (conflict-free
// stores).
template <int Rows, int Units>
struct StepPieces {
  static constexpr int kPerRow = Units / 8, kPieces = Rows * kPerRow / kThreads;
  static_assert(Units % 32 == 0 && Rows * kPerRow == kPieces * kThreads,
                "whole mma steps; every thread the same number of pieces");
  __device__ static int row(int h) { return (threadIdx.x + h * kThreads) / kPerRow; }
  __device__ static int unit(int h) { return (threadIdx.x + h * kThreads) % kPerRow * 8; }
};

// Embeddings passed as MmaTileInputs' untyped pointers, as entries of H.
template <MmaOperands H>
__host__ __device__ inline const OperandEntry<H>* entries(const void* x) {
  return static_cast<const OperandEntry<H>*>(x);
}

// Whether x's rows (d entries each) may be read 16 bytes at a time.
template <typename Entry>
__host__ __device__ inline bool vector_rows(const Entry* x, int64_t d) {
  return d * int64_t(sizeof(Entry)) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

// Entries k .. k + kPieceEntries<H> (those below d) of row p (if below
// `end`) of x, 0 out of range (adding nothing to the products), as stored
// (float32 ones for TF32 and 3xTF32: rounded or split after ldmatrix).
// `vector`: rows that allow 16-byte loads.
template <MmaOperands H>
__device__ inline StagePiece load_piece_at(const OperandEntry<H>* x, int64_t end, int64_t d,
                                           int64_t p, int64_t k, bool vector) {
  constexpr int n = kPieceEntries<H>;
  if (vector && p < end && k < d)  // whole pieces: all n entries are in range
    return *reinterpret_cast<const StagePiece*>(x + p * d + k);
  OperandEntry<H> e[n];
#pragma unroll
  for (int i = 0; i < n; ++i) e[i] = (p < end && k + i < d) ? x[p * d + k + i] : OperandEntry<H>(0);
  StagePiece piece;
  memcpy(&piece, e, sizeof(piece));  // entry i at byte i * sizeof(entry), as in memory
  return piece;
}

// This thread's pieces of a staging step: entries k0 .. k0 + Units /
// kUnitsPerEntry<H> of rows row0 .. row0 + Rows (those below `end`, the
// others 0) of x into a staged block [Rows][stride] from unit `unit` of each
// row.
// Rows that allow it go by cp.async (mma.cuh; in flight until the caller's
// commit_copies and wait_copies), others by loads and stores.
template <MmaOperands H, int Rows = kMmaEdge, int Units = kMmaDepth>
__device__ inline void stage_step(const OperandEntry<H>* x, int64_t end, int64_t d,
                                  int64_t row0, int64_t k0, bool vector, uint16_t* stage,
                                  int stride = kMmaStride, int unit = 0) {
  using Pieces = StepPieces<Rows, Units>;
#pragma unroll
  for (int h = 0; h < Pieces::kPieces; ++h) {
    const int64_t p = row0 + Pieces::row(h), k = k0 + Pieces::unit(h) / kUnitsPerEntry<H>;
    uint16_t* to = stage + Pieces::row(h) * stride + unit + Pieces::unit(h);
    if (vector) {
      const bool inside = p < end && k < d;
      copy_async_16(to, inside ? x + p * d + k : x, inside);
    } else {
      *reinterpret_cast<StagePiece*>(to) = load_piece_at<H>(x, end, d, p, k, false);
    }
  }
}

// The 3xTF32 products (mma.cuh) of the raw float32 fragments a and b (two
// column groups) into acc0 and acc1. (A is split again for every column
// pair: four conversions, against keeping eight more registers live.)
__device__ inline void mma_3xtf32(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a)[4],
                                  const uint32_t (&b)[4]) {
  uint32_t a_big[4], a_small[4], b_big[4], b_small[4];
  split_tf32(a, a_big, a_small, 4);
  split_tf32(b, b_big, b_small, 4);
  const uint32_t big0[2] = {b_big[0], b_big[1]}, big1[2] = {b_big[2], b_big[3]};
  const uint32_t small0[2] = {b_small[0], b_small[1]}, small1[2] = {b_small[2], b_small[3]};
  mma_step<MmaOperands::Tf32>(acc0, a_small, big0);
  mma_step<MmaOperands::Tf32>(acc1, a_small, big1);
  mma_step<MmaOperands::Tf32>(acc0, a_big, small0);
  mma_step<MmaOperands::Tf32>(acc1, a_big, small1);
  mma_step<MmaOperands::Tf32>(acc0, a_big, big0);
  mma_step<MmaOperands::Tf32>(acc1, a_big, big1);
}

// Accumulator tile (m, j) of a warp's accumulators: float[kTilesN][4]
// for one row of mma tiles, float[kTilesM][kTilesN][4] for several.
template <typename Acc>
__device__ inline auto& acc_tile(Acc& acc, int m, int j) {
  if constexpr (std::rank_v<Acc> == 3)
    return acc[m][j];
  else
    return acc[j];
}

// B fragments of the 8-column groups col0 and col0 + 8 of TF32 entries
// staged [k][column] (rows `stride` floats apart, from k0): ldmatrix .trans
// moves 16-bit entries only, so one 32-bit shared load per register, where
// mma.cuh's table puts the entries: b[0] = B[k0 + t][col0 + g], b[1] =
// B[k0 + t + 4][col0 + g], b[2] and b[3] the same 8 columns on. A stride of
// 8 words (mod 32) puts the 32 lanes' loads on distinct banks.
__device__ inline void tf32_columns_along_k(uint32_t (&b)[4], const uint16_t* cols, int k0,
                                            int col0, int stride) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const uint16_t* at = cols + 2 * ((k0 + t) * stride + col0 + g);
  b[0] = shared_word(at);
  b[1] = shared_word(at + 2 * 4 * stride);
  b[2] = shared_word(at + 2 * 8);
  b[3] = shared_word(at + 2 * (4 * stride + 8));
}

// acc tile (m, j) += (the warp's staged rows m*16 .. m*16 + 16) x (its
// columns j*8 .. j*8 + 8)^T over `Depth` staging units (columns `Stride`
// units apart, rows `row_stride`, each row 16-byte aligned), for the
// kTilesM x kTilesN tiles of acc (MmaShape::Acc). Fragments come by ldmatrix
// (mma.cuh): lane l addresses row l % 8 of matrix l / 8, which is, for A,
// rows (0-7 | 8-15) x entries (0-7 | 8-15) in the order of a[0..3]; for B,
// two 8-column groups x the two entry halves, the registers of b for
// groups j and j + 1. With ColumnsAlongK the columns are staged transposed,
// [entry][column] (the product's k along the staged rows), and ldmatrix
// .trans delivers them (TF32 ones: tf32_columns_along_k).
template <MmaOperands H, int Depth = kMmaDepth, int Stride = kMmaStride,
          bool ColumnsAlongK = false, typename Acc>
__device__ inline void warp_products(const uint16_t* rows, const uint16_t* cols, int warp_row,
                                     int warp_col, Acc& acc, int row_stride = Stride) {
  static_assert(Stride * 2 % 16 == 0, "ldmatrix reads 16-byte aligned rows");
  constexpr int kTilesM = std::rank_v<Acc> == 3 ? std::extent_v<Acc, 0> : 1;
  constexpr int kTilesN = std::extent_v<Acc, std::rank_v<Acc> - 2>;
  const int m = threadIdx.x % 32 / 8, i = threadIdx.x % 8;
  const uint16_t* a_row = rows + (warp_row + m % 2 * 8 + i) * row_stride + m / 2 * 8;
  const uint16_t* b_row = ColumnsAlongK
                              ? cols + (m % 2 * 8 + i) * Stride + warp_col + m / 2 * 8
                              : cols + (warp_col + m / 2 * 8 + i) * Stride + m % 2 * 8;
#pragma unroll
  for (int k = 0; k < Depth; k += 16) {
    uint32_t a[kTilesM][4];
#pragma unroll
    for (int tm = 0; tm < kTilesM; ++tm) {
      ldmatrix_x4(a[tm], a_row + tm * 16 * row_stride + k);
      operand_fragment<H>(a[tm], 4);
    }
#pragma unroll
    for (int j = 0; j < kTilesN; j += 2) {
      uint32_t b[4];
      if constexpr (ColumnsAlongK && kUnitsPerEntry<H> == 2)
        tf32_columns_along_k(b, cols, k / 2, warp_col + j * 8, Stride / 2);
      else if constexpr (ColumnsAlongK)
        ldmatrix_x4_trans(b, b_row + k * Stride + j * 8);
      else
        ldmatrix_x4(b, b_row + j * 8 * Stride + k);
      operand_fragment<H>(b, 4);
#pragma unroll
      for (int tm = 0; tm < kTilesM; ++tm) {
        if constexpr (H == MmaOperands::Tf32x3) {
          mma_3xtf32(acc_tile(acc, tm, j), acc_tile(acc, tm, j + 1), a[tm], b);
        } else {
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_step<H>(acc_tile(acc, tm, j), a[tm], b0);
          mma_step<H>(acc_tile(acc, tm, j + 1), a[tm], b1);
        }
      }
    }
  }
}

// Rows held in shared memory for a block's whole sweep (top-k: a block
// keeps its 64 query rows while the bank's columns change), so that each
// step stages only the columns: half the bytes from L2 per product.
// A staged row: every entry of d in whole steps (zero past d), plus 8 units
// of pad: a stride of 16s + 4 words, so the rows r = 0..7 that one ldmatrix
// phase reads (16 bytes each) start at bank 4 (r (4s + 1) mod 8), eight
// distinct groups of four banks.
template <MmaOperands H>
__host__ __device__ inline int resident_row_stride(int64_t d) {
  const int64_t units = d * kUnitsPerEntry<H>;
  return static_cast<int>((units + kMmaDepth - 1) / kMmaDepth * kMmaDepth + 8);
}
template <MmaOperands H>
__host__ __device__ inline size_t resident_rows_bytes(int64_t d) {
  return static_cast<size_t>(kMmaEdge) * resident_row_stride<H>(d) * sizeof(uint16_t);
}

// Rows row0 .. row0 + 64 (those below `end`; the others 0) of x, every
// entry, into rows[64][resident_row_stride<H>(d)].
template <MmaOperands H>
__device__ inline void stage_resident_rows(const OperandEntry<H>* x, int64_t end, int64_t d,
                                           int64_t row0, uint16_t* rows) {
  constexpr int64_t kStep = kMmaDepth / kUnitsPerEntry<H>;  // entries per step
  const int stride = resident_row_stride<H>(d), steps = (stride - 8) / kMmaDepth;
  const bool vector = vector_rows(x, d);
  for (int step = 0; step < steps; ++step)
    stage_step<H>(x, end, d, row0, step * kStep, vector, rows, stride, step * kMmaDepth);
  commit_copies();
  wait_copies<0>();
  __syncthreads();
}

// Staging step `step` (of `steps`) of the columns tc .. tc + Shape::kCols
// and, unless Resident, the rows tr .. tr + Shape::kRows of the view into
// the ring's buffers step % kStages (sub_tile_products), closed as one
// commit group (empty past the last step, so that every step counts one
// group).
template <MmaOperands H, bool Resident, typename Shape>
__device__ inline void stage_operands(const OperandEntry<H>* x_r, const OperandEntry<H>* x_c,
                                      int64_t d, const TileView& view, int64_t tr, int64_t tc,
                                      bool vector_r, bool vector_c, int64_t step,
                                      int64_t steps, uint16_t* stage) {
  constexpr int64_t kStep = kMmaDepth / kUnitsPerEntry<H>;  // entries per step
  if (step < steps) {
    const int buffer = static_cast<int>(step % kStages);
    stage_step<H, Shape::kCols>(x_c, view.c0 + view.cols, d, view.c0 + tc, step * kStep,
                                vector_c, stage + buffer * Shape::kColumnBufferEntries);
    if constexpr (!Resident)
      stage_step<H, Shape::kRows>(
          x_r, view.r0 + view.rows, d, view.r0 + tr, step * kStep, vector_r,
          stage + Shape::kColumnStageEntries + buffer * Shape::kRowBufferEntries);
  }
  commit_copies();
}

// The sub-tile at (tr, tc) of the view of x_r x_c^T (d entries per row) into
// acc, the warp's share (Shape: MmaShape), staged step by step through
// `stage` (Shape::kStageEntries, 16-byte aligned) in a ring of kStages
// buffers: while the warps multiply one step, the next kStages - 1 land.
// One barrier per step: a buffer is refilled only after every thread has
// passed the barrier that follows its last read. With Resident (rows from
// stage_resident_rows for the view's rows tr .., at `resident`) only the
// columns are staged (the first Shape::kColumnStageEntries of `stage`) and
// x_r is not read.
template <MmaOperands H, bool Resident = false, typename Shape = MmaSquare>
__device__ inline void sub_tile_products(const OperandEntry<H>* x_r, const OperandEntry<H>* x_c,
                                         int64_t d, const TileView& view, int64_t tr,
                                         int64_t tc, uint16_t* stage, typename Shape::Acc& acc,
                                         const uint16_t* resident = nullptr) {
  const int warp_row = Shape::warp_row(), warp_col = Shape::warp_col();
  const bool vector_r = !Resident && vector_rows(x_r, d), vector_c = vector_rows(x_c, d);
  const int resident_stride = Resident ? resident_row_stride<H>(d) : kMmaStride;
  constexpr int64_t kStep = kMmaDepth / kUnitsPerEntry<H>;  // entries per step
  const int64_t steps = (d + kStep - 1) / kStep;
  for (int step = 0; step < kStages - 1; ++step)
    stage_operands<H, Resident, Shape>(x_r, x_c, d, view, tr, tc, vector_r, vector_c, step,
                                       steps, stage);
  for (int64_t step = 0; step < steps; ++step) {
    wait_copies<kStages - 2>();  // this thread's pieces of the step have landed
    __syncthreads();             // everyone's; and the buffer refilled next is free
    stage_operands<H, Resident, Shape>(x_r, x_c, d, view, tr, tc, vector_r, vector_c,
                                       step + kStages - 1, steps, stage);
    const int buffer = static_cast<int>(step % kStages);
    const uint16_t* cols = stage + buffer * Shape::kColumnBufferEntries;
    if constexpr (Resident)
      warp_products<H>(resident + step * kMmaDepth, cols, warp_row, warp_col, acc,
                       resident_stride);
    else
      warp_products<H>(stage + Shape::kColumnStageEntries + buffer * Shape::kRowBufferEntries,
                       cols, warp_row, warp_col, acc);
  }
  __syncthreads();  // the caller may restage or reuse the buffers
}

// sub_tile_products with the view's rows resident (stage_resident_rows):
// only the columns tc .. tc + Shape::kCols pass through `stage`
// (Shape::kColumnStageEntries).
template <MmaOperands H, typename Shape = MmaSquare>
__device__ inline void sub_tile_products_resident(const uint16_t* rows, const OperandEntry<H>* x_c,
                                                  int64_t d, const TileView& view, int64_t tc,
                                                  uint16_t* stage, typename Shape::Acc& acc) {
  sub_tile_products<H, true, Shape>(x_c, x_c, d, view, 0, tc, stage, acc, rows);
}

// pair_at, not inlined: the kernel's unrolled loop over its accumulators
// keeps them in registers, and the kind's terms are compiled once.
template <typename Terms>
__device__ __noinline__ PairSums pair_epilogue(const Terms& terms, const PairTileArgs<float>& a,
                                               const TileView& view, const TileMask& mask,
                                               int64_t r, int64_t c, float s, float t) {
  return pair_at(terms, a, view, mask, r, c, s, t);
}

// True when every pair of the sub-tile at (tr, tc), Cols wide, lies below
// the diagonal of a symmetric op (column < row), where the pair weight is 0:
// about half the sub-tiles of a diagonal tile.
template <int Cols = kMmaEdge>
__device__ inline bool below_diagonal(const TileView& view, const TileMask& mask, int64_t tr,
                                      int64_t tc) {
  const int64_t end = tc + Cols < view.cols ? tc + Cols : view.cols;
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

template <typename Terms, MmaOperands H>
__global__ void pair_tile_mma_kernel(Terms terms, PairTileArgs<float> a, MmaTileInputs in,
                                     TileView view, TileMask mask) {
  uint16_t* stage = dynamic_shared<uint16_t>();  // kStageBytes
  __shared__ double shared[kThreads];
  int64_t tr, tc;
  MmaSquare::block_sub_tile(view, &tr, &tc);
  if (below_diagonal(view, mask, tr, tc)) {  // the whole block leaves together
    zero_sub_tile(a, view, tr, tc);
    if (threadIdx.x < 3) a.sums[blockIdx.x * 3 + threadIdx.x] = 0.0;
    return;
  }
  float s[4][4] = {}, t[4][4] = {};
  sub_tile_products<H>(entries<H>(in.xs_r), entries<H>(in.xs_c), in.ds, view, tr, tc, stage, s);
  if (in.xt_r)
    sub_tile_products<H>(entries<H>(in.xt_r), entries<H>(in.xt_c), in.dt, view, tr, tc, stage, t);

  PairSums sums;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i)
      sums.add(pair_epilogue(terms, a, view, mask, tr + entry_row(i), tc + entry_col(j, i),
                             s[j][i], t[j][i]));
  store_block_sums(sums, shared, a.sums);
}

template <typename Terms>
int launch_pair_tile_mma(const Terms& terms, const PairTileArgs<float>& args,
                         const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                         Stream stream) {
  if (view.rows * view.cols == 0) return 0;
  int status = 0;
  with_operands(in.operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    status = allow_dynamic_shared(pair_tile_mma_kernel<Terms, H>, kStageBytes);
    if (status != 0) return;
    RELKD_LAUNCH_SHARED(pair_tile_mma_blocks(view), kThreads, kStageBytes, stream,
                        pair_tile_mma_kernel<Terms, H>)(terms, args, in, view, mask);
    status = launched();
  });
  return status;
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
