// The torch-free interface between the CUDA glue (csrc/cuda_glue.cpp, built
// against torch's headers, which may be a CPU-only torch) and the kernels
// (csrc/cuda/*.cu, built by nvcc without torch). Everything crosses as raw
// device pointers, sizes and the caller's stream (a cudaStream_t as void*).
// Every launcher returns 0 or a cudaError_t code (see error_string).
//
// Each primitive's tiles come from torch's GEMM in the glue (at::mm follows
// torch.get_float32_matmul_precision); these kernels are the epilogues that
// consume a tile while it is in memory: masks, running top-k, pair losses
// and derivative tiles, histograms, candidate collection.
#pragma once

#include <stdint.h>

namespace relkd {
namespace cuda {

using Stream = void*;

// The format the tensor-core kernels round their operands to (and multiply
// in, fp32 accumulation): bfloat16 for float32 embeddings at matmul
// precision "medium" (or RELKD_TENSOR_CORES=1) and for bfloat16 ones,
// float16 for float16 ones (their values exactly), TF32 (10 fraction bits,
// float32's range) for float32 ones at "high", and 3xTF32 at "highest":
// each entry as a TF32 value plus a TF32 remainder, three products per
// pair of entries (float32's accuracy).
// The kernels read the embeddings stored in that format: bfloat16 / float16
// tensors for the 16-bit formats (already rounded: half the bytes of
// float32, and 16-bit inputs need no copy), float32 ones for TF32 and 3xTF32
// (rounded, or split, as they are staged). Their pointers below are untyped
// for that reason (const void*).
enum class MmaOperands : int { Bf16 = 0, Fp16 = 1, Tf32 = 2, Tf32x3 = 3 };

const char* error_string(int code);

// The tensor-core kernels' staging as compiled (pair_tile_mma.cuh): 16-bit
// units per step and steps staged at once, and the sub-tiles.
struct MmaTiling {
  int depth, stages;                        // units per staging step, steps staged
  int wide_cols, warp_rows, warp_cols;      // MmaWide: 64 x wide_cols, its warps' share
  int select_rows, select_cols, select_warp_rows, select_warp_cols;  // SelectShape
};
MmaTiling mma_tiling();

// Which (row, column) pairs a tile holds and how they are weighted
// (csrc/pair_math.h): ids / labels are device arrays (nullptr: positions /
// no labels), indexed by the tile's global row / column positions.
struct TileMask {
  int mask;          // pm::Mask
  bool symmetric;
  const int64_t* ids_r;
  const int64_t* ids_c;
  const int64_t* lab_r;
  const int64_t* lab_c;
};

// A tile: rows x cols values at `data` (row-major, leading dimension ld),
// holding the pairs of global row positions r0.. and column positions c0..
struct TileView {
  int64_t r0, rows, c0, cols, ld;
};

// ------------------------------------------------------------- topk_sim
// Values a row's selection takes between two selections: the state's
// capacity must exceed k by at least this much.
constexpr int64_t kTopkChunk = 1024;

// Per-row running selection of the best (value, column) pairs, kept in
// device buffers across the column tiles of one block of query rows.
template <typename T>
struct TopkState {
  T* values;          // rows x cap
  int32_t* columns;   // rows x cap
  int32_t* size;      // rows: entries in use
  uint64_t* bar_hi;   // rows: the k-th best composite key (see topk_sim.cu)
  uint32_t* bar_lo;
  int32_t* has_bar;   // rows
  int64_t cap, k;     // capacity per row, pairs kept (min(k, M))
};

struct TopkValidity {
  const int64_t* q_labels;  // by global query row; nullptr: no label exclusion
  const int64_t* c_labels;  // by global bank column
  bool exclude_self;
  int64_t self_offset;
};

// Offers one (rows x cols) tile of similarities (times scale[c0 + j] when
// scale is given) to the selections of rows r0.. of the block.
int topk_offer_tile(const float* tile, const TileView& view, int64_t block_r0,
                    const float* scale, const TopkValidity& valid, const TopkState<float>& st,
                    Stream stream);
int topk_offer_tile(const double* tile, const TileView& view, int64_t block_r0,
                    const double* scale, const TopkValidity& valid,
                    const TopkState<double>& st, Stream stream);

// The same for the view's query rows (q) against its bank columns (c), both
// stored in the `operands` format (above) with d entries per row, the
// similarities computed in the kernel on tensor cores (fp32 accumulation;
// sm_80+) instead of
// read from a tile. The view's columns are cut into `splits` ranges, each
// with its own selection: the state has rows * splits slots (slot
// row * splits + split) of capacity cap, which must exceed k by at least 128
// (the columns of one sub-tile).
// With splits > 1 each row's selections are then joined at the front of its
// splits * cap entries, their count in merged[row]: finish the state
// {values, columns, merged, ..., splits * cap, k}.
int topk_offer_mma(const void* q, const void* c, int64_t d, const TileView& view,
                   int64_t block_r0, int splits, const float* scale, const TopkValidity& valid,
                   const TopkState<float>& st, int32_t* merged, MmaOperands operands,
                   Stream stream);

// Whether topk_offer_mma's block holds its 64 query rows of d entries in
// the `operands` format in shared memory (up to about 1,400 16-bit entries
// or 700 TF32 ones on an H100); else the tile path runs.
bool topk_mma_fits(int device, int64_t d, MmaOperands operands);

// How many column ranges (at most `most`) topk_offer_mma should cut a bank
// of m columns into for `rows` query rows of d entries: each range long
// enough for the bar to prune most of it, and the blocks filling their last
// wave on the device best (fullest_wave_splits, tile_plan.h).
int topk_mma_splits(int device, int64_t rows, int64_t m, int64_t d, MmaOperands operands,
                    int64_t most);

// Writes each row's best out_k pairs sorted (value descending, ties to the
// smaller column) to values / indices (rows x out_k), padding (-inf, -1).
// Above kFinishRankMost pairs per row they come unsorted (the kernel ranks
// each pair against every other, out_k^2 compares a row: 10^10 at
// out_k = 10^5) and the caller sorts them (torch's sort: O(k log k)).
constexpr int64_t kFinishRankMost = 2048;
int topk_finish(const TopkState<float>& st, int64_t rows, int64_t out_k, float* values,
                int64_t* indices, Stream stream);
int topk_finish(const TopkState<double>& st, int64_t rows, int64_t out_k, double* values,
                int64_t* indices, Stream stream);

// ------------------------------------------------------------- pair_dot
int pair_dot_forward(const float* a, const float* b, const int64_t* idx, int64_t n, int64_t k,
                     int64_t d, float* out, Stream stream);
int pair_dot_forward(const double* a, const double* b, const int64_t* idx, int64_t n,
                     int64_t k, int64_t d, double* out, Stream stream);
// grad_a[i] = sum_s grad[i, s] b[idx[i, s]]
int pair_dot_grad_rows(const float* grad, const float* b, const int64_t* idx, int64_t n,
                       int64_t k, int64_t d, float* grad_a, Stream stream);
int pair_dot_grad_rows(const double* grad, const double* b, const int64_t* idx, int64_t n,
                       int64_t k, int64_t d, double* grad_a, Stream stream);
// grad_b[j] = sum over the entries e of column j (entries[start[j] .. start[j+1]),
// flat e = i * k + s, increasing) of grad[e] a[e / k]: a fixed order.
int pair_dot_grad_columns(const float* grad, const float* a, const int64_t* entries,
                          const int64_t* start, int64_t m, int64_t k, int64_t d, float* grad_b,
                          Stream stream);
int pair_dot_grad_columns(const double* grad, const double* a, const int64_t* entries,
                          const int64_t* start, int64_t m, int64_t k, int64_t d,
                          double* grad_b, Stream stream);

// --------------------------------------------------------- pairwise_loss
enum class PairKind : int { Cckd = 0, EkdPos = 1, RkdDistSum = 2, RkdDistance = 3 };

// One tile of a pairwise_loss kind. s (student dots) and t (teacher dots, or
// nullptr) are overwritten by the derivative tiles d loss / d s and
// d loss / d t (where requested, else left as they are). dn (rows x cols,
// or nullptr) receives d loss / d squared norm of each pair (RKD kinds: the
// same for its row and its column). Each thread block adds its partial
// sums of loss, d/dparams[0], d/dparams[1] to sums[block * 3 + ...] in
// double; the caller reduces them in a fixed order.
template <typename T>
struct PairTileArgs {
  PairKind kind;
  T* s;
  T* t;
  T* dn;
  const T* ns_r;  // squared norms of the tile's rows / columns (RKD), by global position
  const T* ns_c;
  const T* nt_r;
  const T* nt_c;
  const T* params;  // device
  int64_t n_params;
  bool grad_s, grad_t;
  double* sums;
};

// Blocks the tile kernel uses for a tile (the size of `sums` / 3).
int64_t pair_tile_blocks(const TileView& view);
int pair_tile(const PairTileArgs<float>& args, const TileView& view, const TileMask& mask,
              Stream stream);
int pair_tile(const PairTileArgs<double>& args, const TileView& view, const TileMask& mask,
              Stream stream);

// The same tile on tensor cores (csrc/cuda/pair_tile_mma.cuh): the
// similarities are computed in the kernel from the embeddings (stored in
// the `operands` format, fp32 accumulation) instead of being read from
// args.s / args.t, which receive only the derivative tiles (where
// requested). Needs sm_80 or later.
struct MmaTileInputs {
  const void* xs_r;  // student rows / columns, by global position (ds entries each)
  const void* xs_c;
  const void* xt_r;  // teacher rows / columns (dt entries each); nullptr: no teacher
  const void* xt_c;
  int64_t ds, dt;
  MmaOperands operands;
};
bool has_tensor_cores(int device);  // compute capability 8.0 or later
int64_t pair_tile_mma_blocks(const TileView& view);
int pair_tile_mma(const PairTileArgs<float>& args, const MmaTileInputs& in,
                  const TileView& view, const TileMask& mask, Stream stream);

// The symmetric pass with the gradient products inside, on tensor cores
// (csrc/cuda/pair_rows_mma.cuh): grad_s (n x ds) is written whole, the loss
// and its parameter derivatives go to sums (3 per block, pair_rows_mma_blocks
// blocks). Every kind, student gradient only; mask is the symmetric one of
// the tile path.
struct RowsMmaArgs {
  PairKind kind;
  const float* params;  // device
  int64_t n_params;
  const void* xs;  // n x ds, stored in the operands' format
  const void* xt;  // n x dt; nullptr: no teacher
  const float* ns;  // squared norms of the rows as the kernel rounds them (kinds
  const float* nt;  // with norms; else nullptr), student and teacher
  int64_t n, ds, dt;
  float* grad_s;
  double* sums;
  MmaOperands operands;  // of the products (G x X: bf16 for 16-bit ones; see the kernel)
};
// Whether the device's shared memory holds the block's gradient rows (ds
// entries each) beside its G tile for `operands`, and its tensor cores run.
bool rows_mma_fits(int device, int64_t ds, MmaOperands operands);
int64_t pair_rows_mma_blocks(int64_t n);
int pair_rows_mma(const RowsMmaArgs& args, const TileMask& mask, Stream stream);

// Sums of `parts` consecutive blocks of 3 doubles, into out[0..3), in order.
int sum_partials(const double* partials, int64_t parts, double* out, Stream stream);

// ------------------------------------------------------------ pair_select
// What pair_histogram_topk's histogram pass also collects, into device
// buffers: the whole order keys (int64 bit patterns) of the pairs whose bin
// (top 16 key bits; first pass only) is flagged in in_bin, and the pairs
// (value, i, j; i < j their ids) whose order key is >= top_min_key. Each is
// appended while there is room; every one is counted, so a count above the
// cap says the buffer is incomplete.
template <typename T>
struct FirstPassCollect {
  const uint8_t* in_bin = nullptr;  // 65536 flags; nullptr: no keys
  int64_t* keys = nullptr;
  int64_t key_cap = 0;
  unsigned long long* key_count = nullptr;
  uint64_t top_min_key = 0;
  T* top_v = nullptr;  // nullptr: no pairs
  int64_t* top_i = nullptr;
  int64_t* top_j = nullptr;
  int64_t top_cap = 0;
  unsigned long long* top_count = nullptr;
};

// Histogram of the 16-bit digit at `shift` of the order keys of the tile's
// pairs of the mask, one histogram of 65536 counts per prefix (the key bits
// above shift + 16 must equal prefixes[p]; all pairs when shift + 16 is the
// key width); in the first pass also the collections of `first`.
int pair_histogram_tile(const float* s, const TileView& view, const TileMask& mask,
                        const int64_t* prefixes, int64_t n_prefix, int shift,
                        unsigned long long* hist, const FirstPassCollect<float>& first,
                        Stream stream);
int pair_histogram_tile(const double* s, const TileView& view, const TileMask& mask,
                        const int64_t* prefixes, int64_t n_prefix, int shift,
                        unsigned long long* hist, const FirstPassCollect<double>& first,
                        Stream stream);

// Candidates of pair_topk in one tile: pairs of the mask whose order key is
// above `tau` are appended to (above_v, above_i, above_j) while fewer than
// above_cap are there (above_count counts them all); for pairs whose key
// equals tau, tie_keys[r * cols + c] = (i << 32) | j (i < j, the pair's ids),
// else INT64_MAX, and tie_count counts them.
int pair_collect_tile(const float* s, const TileView& view, const TileMask& mask,
                      uint64_t tau, float* above_v, int64_t* above_i, int64_t* above_j,
                      int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                      unsigned long long* tie_count, Stream stream);
int pair_collect_tile(const double* s, const TileView& view, const TileMask& mask,
                      uint64_t tau, double* above_v, int64_t* above_i, int64_t* above_j,
                      int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                      unsigned long long* tie_count, Stream stream);

// The same two passes on tensor cores (csrc/cuda/pair_select_mma.cu): the
// view's similarities x_r x_c^T computed in the kernels from in.xs_r,
// in.xs_c (in.ds entries per row, in the in.operands format; the teacher
// fields unused) instead of read from a tile. Needs sm_80 or later.
int pair_histogram_mma(const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                       const int64_t* prefixes, int64_t n_prefix, int shift,
                       unsigned long long* hist, const FirstPassCollect<float>& first,
                       Stream stream);
int pair_collect_mma(const MmaTileInputs& in, const TileView& view, const TileMask& mask,
                     uint64_t tau, float* above_v, int64_t* above_i, int64_t* above_j,
                     int64_t above_cap, unsigned long long* above_count, int64_t* tie_keys,
                     unsigned long long* tie_count, Stream stream);

}  // namespace cuda
}  // namespace relkd
