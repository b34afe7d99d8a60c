// The symmetric pairwise_loss pass with its gradient products inside, on
// tensor cores (FlashAttention-2 style): each thread block owns 64 rows and
// sweeps every column block. Per sub-tile (RowsShape: 64 x 128 unless built
// with RELKD_MMA_WIDE=0) it computes the
// similarities with mma (pair_tile_mma.cuh; bf16 or fp16 operands), the
// derivative G_pq = W_pq dl/ds(s_pq) in registers, W_pq = w(p, q) + w(q, p)
// the ordered masks of both orders, rounds G to bf16 in shared memory and
// multiplies it straight back by the column rows: grad_p += sum_q G_pq x_q,
// accumulated in shared memory (fp32). That product is bf16 whatever the
// operands: a pair's derivative carries the loss's 1/N^2-like scale, below
// float16's range (2^-24) at the batch sizes this pass serves, while
// bfloat16 keeps float32's exponent. Neither a similarity nor a derivative tile reaches
// global memory, and every gradient row is written once by its owner: no
// atomics, bitwise reproducible. The loss is (1/2) sum_pq W_pq l_pq, the
// symmetric sum of the tile path (the params' derivatives likewise). Kinds
// with squared norms (RKD's distances, n_p = |x_p|^2) also sum each row's
// dl/dn_p = sum_q W_pq dl/dn over the sweep (per thread, in double, then in
// a fixed order) and add 2 (dl/dn_p) x_p to its gradient row at the end
// (x_p as the products saw it: in the operand format, as the norms the glue
// passes). Student gradient only.
#pragma once

#include "pair_tile_mma.cuh"

namespace relkd {
namespace cuda {

// The sub-tile of the similarities: MmaWide, warps of 32 x 32 (16 FLOP per
// byte read from shared memory, against 11 for 16 x 32), 128 columns: G x X
// then multiplies over k = 128 columns per chunk. Its 64 x 64 output chunks
// (64 gradient rows x 64 embedding entries) use MmaSquare's warps.
using RowsShape = MmaWide;
constexpr int kRowsCols = RowsShape::kCols;
constexpr int kGStride = kRowsCols + 8;      // a row of the G tile
constexpr int kChunkStride = kMmaEdge + 8;   // a staged column row of a G x X chunk
static_assert(RowsShape::kRows == kMmaEdge, "a block's rows are G x X's output rows");

// G x X's chunks go through a ring of kStages buffers in the staging
// memory, free once the sub-tile's similarities are done.
constexpr int kChunkEntries = kRowsCols * kChunkStride;
constexpr int kRowsStageEntries = RowsShape::kStageEntries > kStages * kChunkEntries
                                      ? RowsShape::kStageEntries
                                      : kStages * kChunkEntries;

// Shared memory of the dynamic part: the staging buffers (also the G x X
// chunks' ring) and the block's gradient rows (64 x ds fp32).
inline size_t rows_mma_dynamic_bytes(int64_t ds) {
  return kRowsStageEntries * sizeof(uint16_t) +
         static_cast<size_t>(kMmaEdge) * static_cast<size_t>(ds) * sizeof(float);
}

// A piece of 16-bit entries of format H as bf16 (float16 ones rounded to
// it: their values are floats exactly, so this is the bf16 nearest to them).
template <MmaOperands H>
__device__ inline StagePiece as_bf16(StagePiece piece) {
  if constexpr (H == MmaOperands::Fp16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = piece.bits[i];
      piece.bits[i] = uint32_t(bf16_bits(fp16_value(uint16_t(w & 0xffffu)))) |
                      (uint32_t(bf16_bits(fp16_value(uint16_t(w >> 16)))) << 16);
    }
  }
  return piece;
}

// Entries d0 .. d0 + 64 of rows c0 .. c0 + kRowsCols (below n) of x (d
// entries per row, format H) into stage[kRowsCols (row)][kChunkStride] as
// bf16, 0 out of range: the B operand of G x X, whose k index (the column
// row) runs along the staged rows, read by ldmatrix .trans. bf16 rows go as
// stored (cp.async where 16-byte aligned: in flight until the caller's
// wait); float16 ones through registers, rounded to bf16. The eight threads
// of a store phase fill one row.
template <MmaOperands H>
__device__ inline void stage_chunk(const OperandEntry<H>* x, int64_t n, int64_t d, int64_t c0,
                                   int64_t d0, bool vector, uint16_t* stage) {
  using Pieces = StepPieces<kRowsCols, kMmaEdge>;
  if constexpr (H == MmaOperands::Bf16) {
    stage_step<H, kRowsCols, kMmaEdge>(x, n, d, c0, d0, vector, stage, kChunkStride);
  } else {
#pragma unroll
    for (int h = 0; h < Pieces::kPieces; ++h) {
      const int row = Pieces::row(h), entry = Pieces::unit(h);
      const StagePiece piece =
          as_bf16<H>(load_piece_at<H>(x, n, d, c0 + row, d0 + entry, vector));
      *reinterpret_cast<StagePiece*>(stage + row * kChunkStride + entry) = piece;
    }
  }
}
static_assert(kChunkStride * 2 % 16 == 0 && kGStride * 2 % 16 == 0, "16-byte aligned rows");

// Chunk `chunk` (of `chunks`) into the ring's buffer chunk % kStages, one
// commit group per chunk (empty past the last), as sub_tile_products' steps.
template <MmaOperands H>
__device__ inline void stage_chunk_ring(const OperandEntry<H>* x, int64_t n, int64_t d,
                                        int64_t c0, int64_t chunk, int64_t chunks, bool vector,
                                        uint16_t* ring) {
  if (chunk < chunks)
    stage_chunk<H>(x, n, d, c0, chunk * kMmaEdge, vector,
                   ring + chunk % kStages * kChunkEntries);
  commit_copies();
}

// The sub-tile's pair terms with weights W_pq, derivatives into g_tile as
// bf16, dl/dn_p added to *dn_p (kinds with norms).
template <typename Terms>
__device__ __noinline__ PairSums rows_pair(const Terms& terms, const TileMask& ordered,
                                           const RowsMmaArgs& a, int64_t p, int64_t q, float s,
                                           float t, uint16_t* g_at, double* dn_p) {
  const int64_t n = a.n;
  const int w = (p < n && q < n) ? tile_weight(ordered, p, q) + tile_weight(ordered, q, p) : 0;
  if (w == 0) {
    *g_at = 0;
    return {};
  }
  const pm::PairTerms<float> pt =
      terms(float(w), s, t, a.ns ? a.ns[p] : 0.0f, a.ns ? a.ns[q] : 0.0f,
            a.nt ? a.nt[p] : 0.0f, a.nt ? a.nt[q] : 0.0f);
  *g_at = bf16_bits(pt.ds);
  *dn_p += double(pt.dn_i);  // = dn_j: W_pq counts both orders already
  PairSums out;  // each unordered pair is met twice
  out.loss = 0.5 * double(pt.loss);
  out.dmu_s = 0.5 * double(pt.dmu_s);
  out.dmu_t = 0.5 * double(pt.dmu_t);
  return out;
}

// Row r's dl/dn_r (kNormParts partial sums per row, one per thread that
// visits the row, summed in a fixed order) into dn_rows[r]. A thread visits
// kRowsPerThread rows: rows g and g + 8 of each of its row tiles.
constexpr int kRowsPerThread = 2 * RowsShape::kTilesM;
constexpr int kWarpsAcross = kThreads / 32 / RowsShape::kWarpsDown;
constexpr int kNormParts = kWarpsAcross * 4;  // the 4 lanes of its quad in each warp across
__device__ inline int visited_row(int h) { return RowsShape::entry_row(h / 2, 2 * (h % 2)); }
__device__ inline void sum_norm_parts(const double (&mine)[kRowsPerThread],
                                      double (*parts)[kNormParts], float* dn_rows) {
  const int part = threadIdx.x / 32 / RowsShape::kWarpsDown * 4 + threadIdx.x % 4;
  for (int h = 0; h < kRowsPerThread; ++h) parts[visited_row(h)][part] = mine[h];
  __syncthreads();
  if (threadIdx.x < kMmaEdge) {
    double total = 0;
    for (int k = 0; k < kNormParts; ++k) total += parts[threadIdx.x][k];
    dn_rows[threadIdx.x] = static_cast<float>(total);
  }
  __syncthreads();
}

// The kernel's static shared memory (rows_mma_fits adds its size to the
// dynamic part's).
struct RowsShared {
  alignas(16) uint16_t g_tile[kMmaEdge * kGStride];  // G of the sub-tile, bf16
  double block_sums[kThreads];
  double norm_parts[kMmaEdge][kNormParts];
  float dn_rows[kMmaEdge];
};

template <typename Terms, MmaOperands H>
__global__ void pair_rows_mma_kernel(Terms terms, RowsMmaArgs a, TileMask mask) {
  __shared__ RowsShared sh;
  uint16_t* g_tile = sh.g_tile;
  uint16_t* stage = dynamic_shared<uint16_t>();                      // kRowsStageEntries
  float* grad = reinterpret_cast<float*>(stage + kRowsStageEntries);  // kMmaEdge x ds
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kMmaEdge;
  const int64_t rows = a.n - r0 < kMmaEdge ? a.n - r0 : kMmaEdge;
  for (int64_t e = threadIdx.x; e < kMmaEdge * a.ds; e += kThreads) grad[e] = 0.0f;
  TileMask ordered = mask;
  ordered.symmetric = false;
  const OperandEntry<H>* xs = entries<H>(a.xs);
  const OperandEntry<H>* xt = entries<H>(a.xt);
  const bool vector_x = vector_rows(xs, a.ds);

  PairSums sums;
  double dn_mine[kRowsPerThread] = {};  // dl/dn of this thread's rows, its columns' share
  const int64_t chunks = (a.ds + kMmaEdge - 1) / kMmaEdge;  // of G x X, 64 entries each
  for (int64_t c0 = 0; c0 < a.n; c0 += kRowsCols) {
    const int64_t cols = a.n - c0 < kRowsCols ? a.n - c0 : kRowsCols;
    const TileView view{r0, rows, c0, cols, kRowsCols};
    RowsShape::Acc s = {}, t = {};
    sub_tile_products<H, false, RowsShape>(xs, xs, a.ds, view, 0, 0, stage, s);
    if (xt) sub_tile_products<H, false, RowsShape>(xt, xt, a.dt, view, 0, 0, stage, t);
    // The first chunks of G x X's column rows land while the pair terms run.
    for (int64_t chunk = 0; chunk < kStages - 1; ++chunk)
      stage_chunk_ring<H>(xs, a.n, a.ds, c0, chunk, chunks, vector_x, stage);
#pragma unroll
    for (int m = 0; m < RowsShape::kTilesM; ++m)
#pragma unroll
      for (int j = 0; j < RowsShape::kTilesN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = RowsShape::entry_row(m, i), c = RowsShape::entry_col(j, i);
          sums.add(rows_pair(terms, ordered, a, r0 + r, c0 + c, acc_tile(s, m, j)[i],
                             acc_tile(t, m, j)[i], &g_tile[r * kGStride + c],
                             &dn_mine[m * 2 + i / 2]));
        }
    // grad rows += G x (the column rows), 64 entries of the embedding at a
    // time, through the chunk ring (wait; barrier; issue the chunk kStages -
    // 1 ahead; multiply).
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      wait_copies<kStages - 2>();  // this thread's pieces of the chunk have landed
      __syncthreads();             // everyone's; g_tile complete; the next buffer free
      stage_chunk_ring<H>(xs, a.n, a.ds, c0, chunk + kStages - 1, chunks, vector_x, stage);
      MmaSquare::Acc acc = {};
      warp_products<MmaOperands::Bf16, kRowsCols, kChunkStride, true>(
          g_tile, stage + chunk % kStages * kChunkEntries, MmaSquare::warp_row(),
          MmaSquare::warp_col(), acc, kGStride);
      const int64_t d0 = chunk * kMmaEdge;
#pragma unroll
      for (int j = 0; j < MmaSquare::kTilesN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // each entry has one owner: no race, fixed order
          const int r = entry_row(i);
          const int64_t d = d0 + entry_col(j, i);
          if (d < a.ds) grad[r * a.ds + d] += acc[j][i];
        }
    }
    __syncthreads();  // g_tile and the ring are rewritten by the next column block
  }
  if (a.ns) {  // the squared norms' share: 2 (dl/dn_p) x_p
    sum_norm_parts(dn_mine, sh.norm_parts, sh.dn_rows);
    for (int64_t e = threadIdx.x; e < rows * a.ds; e += kThreads)
      grad[e] += 2.0f * sh.dn_rows[e / a.ds] * entry_value<H>(xs[r0 * a.ds + e]);
  }
  for (int64_t e = threadIdx.x; e < rows * a.ds; e += kThreads) a.grad_s[r0 * a.ds + e] = grad[e];
  store_block_sums(sums, sh.block_sums, a.sums);
}

template <typename Terms, MmaOperands H>
int launch_rows_mma_as(const Terms& terms, const RowsMmaArgs& args, const TileMask& mask,
                       Stream stream) {
  const size_t bytes = rows_mma_dynamic_bytes(args.ds);
  if (const int set = allow_dynamic_shared(pair_rows_mma_kernel<Terms, H>, bytes)) return set;
  RELKD_LAUNCH_SHARED(pair_rows_mma_blocks(args.n), kThreads, bytes, stream,
                      pair_rows_mma_kernel<Terms, H>)(terms, args, mask);
  return launched();
}

template <typename Terms>
int launch_pair_rows_mma(const Terms& terms, const RowsMmaArgs& args, const TileMask& mask,
                         Stream stream) {
  if (args.n == 0) return 0;
  switch (args.operands) {
    case MmaOperands::Bf16: return launch_rows_mma_as<Terms, MmaOperands::Bf16>(terms, args,
                                                                               mask, stream);
    case MmaOperands::Fp16: return launch_rows_mma_as<Terms, MmaOperands::Fp16>(terms, args,
                                                                               mask, stream);
    case MmaOperands::Tf32:
    case MmaOperands::Tf32x3: break;  // its bf16 G x X would undercut them: the tile path runs
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// One launcher per kind, defined in csrc/cuda/pair_tile_<kind>.cu.
int pair_rows_mma_cckd(const RowsMmaArgs&, const TileMask&, Stream);
int pair_rows_mma_ekd_pos(const RowsMmaArgs&, const TileMask&, Stream);
int pair_rows_mma_rkd(const RowsMmaArgs&, const TileMask&, Stream);

}  // namespace cuda
}  // namespace relkd
