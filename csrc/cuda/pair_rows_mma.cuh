// The symmetric pairwise_loss pass with its gradient products inside, on
// tensor cores (FlashAttention-2 style): each thread block owns 64 rows and
// sweeps every column block. Per sub-tile (RowsShape: 64 x 128 unless built
// with RELKD_MMA_WIDE=0) it computes the similarities with mma
// (pair_tile_mma.cuh; any operand format), the derivative G_pq = W_pq
// dl/ds(s_pq) in registers, W_pq = w(p, q) + w(q, p) the ordered masks of
// both orders, stores G in shared memory and multiplies it straight back by
// the column rows: grad_p += sum_q G_pq x_q, accumulated in shared memory
// (fp32). For 16-bit operands that product is bf16, G rounded to it: a
// pair's derivative carries the loss's 1/N^2-like scale, below float16's
// range (2^-24) at the batch sizes this pass serves, while bfloat16 keeps
// float32's exponent. For TF32 and 3xTF32 operands G stays float32 and the
// product is TF32 (G rounded, as torch's TF32 GEMM at "high" rounds its
// operands) or 3xTF32 (float32-level, at "highest"). Neither a similarity
// nor a derivative tile reaches global memory, and every gradient row is
// written once by its owner: no atomics, bitwise reproducible. The loss is
// (1/2) sum_pq W_pq l_pq, the symmetric sum of the tile path (the params'
// derivatives likewise). Kinds with squared norms (RKD's distances, n_p =
// |x_p|^2) also sum each row's dl/dn_p = sum_q W_pq dl/dn over the sweep
// (per thread, in double, then in a fixed order) and add 2 (dl/dn_p) x_p to
// its gradient row at the end (x_p as the products saw it: in the operand
// format, as the norms the glue passes). Student gradient only.
#pragma once

#include <algorithm>

#include "pair_tile_mma.cuh"

namespace relkd {
namespace cuda {

// The sub-tile of the similarities: MmaWide, warps of 32 x 32 (16 FLOP per
// byte read from shared memory, against 11 for 16 x 32), 128 columns. Its
// G x X output chunks (64 gradient rows x 64 embedding entries) use
// MmaSquare's warps.
using RowsShape = MmaWide;
constexpr int kRowsCols = RowsShape::kCols;
static_assert(RowsShape::kRows == kMmaEdge, "a block's rows are G x X's output rows");

// G x X per format H of the embeddings. Its operands: G (the A operand,
// kGStride<H> units per row) in shared memory as bf16 (16-bit formats) or
// float32 (TF32 ones), and chunks of the column rows (B, the product's k
// along the staged rows), 64 embedding entries each, staged in the same
// format as G: kChunkK<H> column rows per chunk, the sub-tile's 128 in one
// bf16 chunk or kChunkSplits<H> float32 ones of 64 (the same bytes).
template <MmaOperands H>
constexpr bool kFloatDerivatives = kUnitsPerEntry<H> == 2;
template <MmaOperands H>
constexpr MmaOperands kProductOperands = kFloatDerivatives<H> ? H : MmaOperands::Bf16;
template <MmaOperands H>
constexpr int kGStride = kRowsCols * kUnitsPerEntry<H> + 8;
template <MmaOperands H>
constexpr int kChunkK = kFloatDerivatives<H> ? kMmaEdge : kRowsCols;
template <MmaOperands H>
constexpr int kChunkSplits = kRowsCols / kChunkK<H>;
template <MmaOperands H>
constexpr int kChunkDepth = kChunkK<H> * kUnitsPerEntry<H>;  // units of k per chunk
// A staged column row: 144 bytes for bf16 (ldmatrix .trans's eight rows on
// distinct banks), 72 words for float32 (tf32_columns_along_k's loads).
template <MmaOperands H>
constexpr int kChunkStride = (kMmaEdge + 8) * kUnitsPerEntry<H>;
template <MmaOperands H>
constexpr int kChunkEntries = kChunkK<H> * kChunkStride<H>;
static_assert(kChunkStride<MmaOperands::Bf16> * 2 % 16 == 0 &&
                  kGStride<MmaOperands::Bf16> * 2 % 16 == 0 &&
                  kGStride<MmaOperands::Tf32> * 2 % 16 == 0 &&
                  kChunkStride<MmaOperands::Tf32> / 2 % 32 == 8,
              "16-byte aligned rows; conflict-free TF32 column loads");

// G x X's chunks go through a ring of kStages buffers in the staging
// memory, free once the sub-tile's similarities are done.
constexpr int kRowsStageEntries =
    std::max({RowsShape::kStageEntries, kStages * kChunkEntries<MmaOperands::Bf16>,
              kStages * kChunkEntries<MmaOperands::Tf32>});

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

// Entries d0 .. d0 + 64 of rows c0 .. c0 + kChunkK<H> (below n) of x (d
// entries per row, format H) into stage[kChunkK<H> (row)][kChunkStride<H>],
// 0 out of range: the B operand of G x X, whose k index (the column row)
// runs along the staged rows. bf16 and float32 (TF32) rows go as stored
// (cp.async where 16-byte aligned: in flight until the caller's wait);
// float16 ones through registers, rounded to bf16. Consecutive threads
// fill one row.
template <MmaOperands H>
__device__ inline void stage_chunk(const OperandEntry<H>* x, int64_t n, int64_t d, int64_t c0,
                                   int64_t d0, bool vector, uint16_t* stage) {
  constexpr int kUnits = kMmaEdge * kUnitsPerEntry<H>;
  if constexpr (H != MmaOperands::Fp16) {
    stage_step<H, kChunkK<H>, kUnits>(x, n, d, c0, d0, vector, stage, kChunkStride<H>);
  } else {
    using Pieces = StepPieces<kChunkK<H>, kUnits>;
#pragma unroll
    for (int h = 0; h < Pieces::kPieces; ++h) {
      const int row = Pieces::row(h), entry = Pieces::unit(h);
      const StagePiece piece =
          as_bf16<H>(load_piece_at<H>(x, n, d, c0 + row, d0 + entry, vector));
      *reinterpret_cast<StagePiece*>(stage + row * kChunkStride<H> + entry) = piece;
    }
  }
}

// Chunk `chunk` (of `chunks`: the 64-entry slices of the embedding, each in
// kChunkSplits<H> chunks of column rows) into the ring's buffer chunk %
// kStages, one commit group per chunk (empty past the last), as
// sub_tile_products' steps.
template <MmaOperands H>
__device__ inline void stage_chunk_ring(const OperandEntry<H>* x, int64_t n, int64_t d,
                                        int64_t c0, int64_t chunk, int64_t chunks, bool vector,
                                        uint16_t* ring) {
  if (chunk < chunks)
    stage_chunk<H>(x, n, d, c0 + chunk % kChunkSplits<H> * kChunkK<H>,
                   chunk / kChunkSplits<H> * kMmaEdge, vector,
                   ring + chunk % kStages * kChunkEntries<H>);
  commit_copies();
}

// A derivative into the G tile (row r, column c): bf16 or float32 (format H).
template <MmaOperands H>
__device__ inline void store_derivative(uint16_t* g_tile, int r, int c, float g) {
  if constexpr (kFloatDerivatives<H>)
    reinterpret_cast<float*>(g_tile)[r * (kGStride<H> / 2) + c] = g;
  else
    g_tile[r * kGStride<H> + c] = bf16_bits(g);
}

// A pair term of the sub-tile (row r, column c) with weight W_pq, its
// derivative into g_tile (store_derivative), dl/dn_p added to *dn_p (kinds
// with norms).
template <MmaOperands H, typename Terms>
__device__ __noinline__ PairSums rows_pair(const Terms& terms, const TileMask& ordered,
                                           const RowsMmaArgs& a, int64_t r0, int64_t c0, int r,
                                           int c, float s, float t, uint16_t* g_tile,
                                           double* dn_p) {
  const int64_t n = a.n, p = r0 + r, q = c0 + c;
  const int w = (p < n && q < n) ? tile_weight(ordered, p, q) + tile_weight(ordered, q, p) : 0;
  if (w == 0) {
    store_derivative<H>(g_tile, r, c, 0.0f);
    return {};
  }
  const pm::PairTerms<float> pt =
      terms(float(w), s, t, a.ns ? a.ns[p] : 0.0f, a.ns ? a.ns[q] : 0.0f,
            a.nt ? a.nt[p] : 0.0f, a.nt ? a.nt[q] : 0.0f);
  store_derivative<H>(g_tile, r, c, pt.ds);
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
template <MmaOperands H>
struct RowsShared {
  alignas(16) uint16_t g_tile[kMmaEdge * kGStride<H>];  // G of the sub-tile (store_derivative)
  double block_sums[kThreads];
  double norm_parts[kMmaEdge][kNormParts];
  float dn_rows[kMmaEdge];
};

// grad rows += the G tile x the staged chunk (chunk of chunks, as
// stage_chunk_ring): a chunk's products add to acc, and its last split adds
// acc to the gradient rows' 64 entries.
template <MmaOperands H>
__device__ inline void chunk_products(const uint16_t* g_tile, const uint16_t* ring,
                                      int64_t chunk, int64_t ds, MmaSquare::Acc& acc,
                                      float* grad) {
  const int split = static_cast<int>(chunk % kChunkSplits<H>);
  if (split == 0)
    for (auto& tile : acc)
      for (float& v : tile) v = 0.0f;
  warp_products<kProductOperands<H>, kChunkDepth<H>, kChunkStride<H>, true>(
      g_tile + split * kChunkDepth<H>, ring + chunk % kStages * kChunkEntries<H>,
      MmaSquare::warp_row(), MmaSquare::warp_col(), acc, kGStride<H>);
  if (split != kChunkSplits<H> - 1) return;
  const int64_t d0 = chunk / kChunkSplits<H> * kMmaEdge;
#pragma unroll
  for (int j = 0; j < MmaSquare::kTilesN; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // each entry has one owner: no race, fixed order
      const int r = entry_row(i);
      const int64_t d = d0 + entry_col(j, i);
      if (d < ds) grad[r * ds + d] += acc[j][i];
    }
}

template <typename Terms, MmaOperands H>
__global__ void pair_rows_mma_kernel(Terms terms, RowsMmaArgs a, TileMask mask) {
  __shared__ RowsShared<H> sh;
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
  // G x X's chunks: 64 entries of the embedding, in kChunkSplits<H> pieces
  const int64_t chunks = (a.ds + kMmaEdge - 1) / kMmaEdge * kChunkSplits<H>;
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
        for (int i = 0; i < 4; ++i)
          sums.add(rows_pair<H>(terms, ordered, a, r0, c0, RowsShape::entry_row(m, i),
                                RowsShape::entry_col(j, i), acc_tile(s, m, j)[i],
                                acc_tile(t, m, j)[i], g_tile, &dn_mine[m * 2 + i / 2]));
    // grad rows += G x (the column rows), through the chunk ring (wait;
    // barrier; issue the chunk kStages - 1 ahead; multiply).
    MmaSquare::Acc acc;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      wait_copies<kStages - 2>();  // this thread's pieces of the chunk have landed
      __syncthreads();             // everyone's; g_tile complete; the next buffer free
      stage_chunk_ring<H>(xs, a.n, a.ds, c0, chunk + kStages - 1, chunks, vector_x, stage);
      chunk_products<H>(g_tile, stage, chunk, a.ds, acc, grad);
    }
    __syncthreads();  // g_tile and the ring are rewritten by the next column block
  }
  if (a.ns) {  // the squared norms' share: 2 (dl/dn_p) x_p
    sum_norm_parts(dn_mine, sh.norm_parts, sh.dn_rows);
    for (int64_t e = threadIdx.x; e < rows * a.ds; e += kThreads)
      grad[e] += 2.0f * sh.dn_rows[e / a.ds] * operand_value<H>(xs[r0 * a.ds + e]);
  }
  for (int64_t e = threadIdx.x; e < rows * a.ds; e += kThreads) a.grad_s[r0 * a.ds + e] = grad[e];
  store_block_sums(sums, sh.block_sums, a.sums);
}

// The static shared memory of the kernel for `operands`.
inline size_t rows_shared_bytes(MmaOperands operands) {
  size_t bytes = 0;
  with_operands(operands, [&](auto format) { bytes = sizeof(RowsShared<decltype(format)::value>); });
  return bytes;
}

template <typename Terms>
int launch_pair_rows_mma(const Terms& terms, const RowsMmaArgs& args, const TileMask& mask,
                         Stream stream) {
  if (args.n == 0) return 0;
  const size_t bytes = rows_mma_dynamic_bytes(args.ds);
  int status = 0;
  with_operands(args.operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    status = allow_dynamic_shared(pair_rows_mma_kernel<Terms, H>, bytes);
    if (status != 0) return;
    RELKD_LAUNCH_SHARED(pair_rows_mma_blocks(args.n), kThreads, bytes, stream,
                        pair_rows_mma_kernel<Terms, H>)(terms, args, mask);
    status = launched();
  });
  return status;
}

// One launcher per kind, defined in csrc/cuda/pair_tile_<kind>.cu.
int pair_rows_mma_cckd(const RowsMmaArgs&, const TileMask&, Stream);
int pair_rows_mma_ekd_pos(const RowsMmaArgs&, const TileMask&, Stream);
int pair_rows_mma_rkd(const RowsMmaArgs&, const TileMask&, Stream);

}  // namespace cuda
}  // namespace relkd
