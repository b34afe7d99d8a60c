// topk_sim on CUDA: the epilogue of each similarity tile. One thread block
// per query row keeps that row's best pairs in a device buffer across the
// column tiles: values that beat the row's bar (its current k-th best) are
// appended in a fixed order; when the buffer fills, an exact block-wide
// radix select keeps the best k and sets the new bar. Pairs are ranked by a
// composite key (value's order key, then the complemented column), which is
// unique per pair: larger value first, ties to the smaller column, NaN below
// every number, and no two pairs tie, so every result is exact and
// deterministic. offer_mma_kernel (below) computes its own tiles on tensor
// cores.
#include <algorithm>

#include "pair_tile_mma.cuh"
#include "../tile_plan.h"

namespace relkd {
namespace cuda {
namespace {

constexpr int kPerThread = 4;
constexpr int64_t kChunk = kThreads * kPerThread;  // values offered between compactions
static_assert(kChunk == kTopkChunk, "the glue sizes the selection state by kTopkChunk");

// Composite ranking key of a (value, column) pair: hi = the value's order
// key (32 or 64 bits), lo = ~column. Larger is better.
struct Key {
  uint64_t hi;
  uint32_t lo;
};

template <typename T>
__device__ __forceinline__ Key key_of(T v, int32_t column) {
  return {static_cast<uint64_t>(pm::order_key(v)), ~static_cast<uint32_t>(column)};
}

__device__ __forceinline__ bool greater(const Key& a, const Key& b) {
  return a.hi != b.hi ? a.hi > b.hi : a.lo > b.lo;
}

__device__ __forceinline__ bool greater_equal(const Key& a, const Key& b) {
  return !greater(b, a);
}

template <typename T>
struct KeyBits {
  static constexpr int value = 8 * sizeof(typename pm::KeyOf<T>::type);  // bits of hi
  static constexpr int passes = (value + 32) / 8;                        // 8-bit digits
};

// The 8-bit digit `pass` (0 = most significant) of the (hi, lo) bit string.
template <typename T>
__device__ __forceinline__ unsigned digit(const Key& k, int pass) {
  const int shift = KeyBits<T>::value + 32 - 8 * (pass + 1);
  return shift >= 32 ? unsigned(k.hi >> (shift - 32)) & 0xFFu : (k.lo >> shift) & 0xFFu;
}

// Whether the top `bits` bits of a and b agree.
template <typename T>
__device__ __forceinline__ bool top_bits_equal(const Key& a, const Key& b, int bits) {
  constexpr int hi_bits = KeyBits<T>::value;
  if (bits == 0) return true;
  if (bits <= hi_bits) return (a.hi >> (hi_bits - bits)) == (b.hi >> (hi_bits - bits));
  const int lo_bits = bits - hi_bits;
  return a.hi == b.hi && (lo_bits == 32 || (a.lo >> (32 - lo_bits)) == (b.lo >> (32 - lo_bits)));
}

template <typename T>
__device__ __forceinline__ Key with_digit(Key k, int pass, unsigned d) {
  const int shift = KeyBits<T>::value + 32 - 8 * (pass + 1);
  if (shift >= 32) {
    k.hi |= static_cast<uint64_t>(d) << (shift - 32);
  } else {
    k.lo |= d << shift;
  }
  return k;
}

struct SelectShared {
  unsigned hist[256];
  int scan[kThreads / 32];  // block_exclusive_scan: one total per warp
  int warp_sums[kThreads / 32];
  Key bar;
  int remaining;
  int in_bin;        // keys in the bin select_digit chose
  unsigned min_lo;   // keep_best's shortcut past the column bits
};
static_assert(kThreads == 256, "select_digit: one thread per 8-bit digit");

// The digit whose bin holds the remaining-th largest key of this pass, into
// sh.bar, and what is left to find below it into sh.remaining. Thread d
// owns bin d; its suffix sum (keys in bins >= d) comes from warp shuffles
// and the warps above it, and exactly one thread's bin straddles the
// target (the histogram holds at least `remaining` keys). Replaces a
// 256-step loop on one thread: keep_best runs up to 8 (float32) of these
// per selection.
template <typename T>
__device__ inline void select_digit(SelectShared& sh, int pass) {
  const int d = threadIdx.x, lane = d % 32, warp = d / 32;
  const int remaining = sh.remaining;  // read before the barrier: one thread rewrites it
  const int count = static_cast<int>(sh.hist[d]);
  int suffix = count;
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int below = __shfl_down_sync(0xffffffffu, suffix, offset);
    if (lane + offset < 32) suffix += below;
  }
  if (lane == 0) sh.warp_sums[warp] = suffix;
  __syncthreads();
  for (int w = warp + 1; w < kThreads / 32; ++w) suffix += sh.warp_sums[w];
  const int above = suffix - count;  // keys in the bins above d
  if (above < remaining && suffix >= remaining) {
    sh.bar = with_digit<T>(sh.bar, pass, static_cast<unsigned>(d));
    sh.remaining = remaining - above;
    sh.in_bin = count;
  }
  __syncthreads();
}

// Keeps the best `keep` of the row's `size` entries (in place, in buffer
// order) and returns the key of the worst kept one: an exact radix select
// over the unique composite keys, one 8-bit digit per pass. Once the value
// bits are resolved, if every key with the boundary value is kept (no tie
// straddles the boundary: the usual case), the worst kept key is the one
// with the smallest column bits among them, found in one pass instead of
// four more.
template <typename T>
__device__ Key keep_best(T* values, int32_t* columns, int size, int keep, SelectShared& sh) {
  constexpr int value_passes = KeyBits<T>::value / 8;
  if (threadIdx.x == 0) {
    sh.bar = Key{0, 0};
    sh.remaining = keep;
    sh.min_lo = 0xffffffffu;
  }
  __syncthreads();
  for (int pass = 0; pass < KeyBits<T>::passes; ++pass) {
    sh.hist[threadIdx.x % 256] = 0;
    __syncthreads();
    const Key prefix = sh.bar;
    for (int e = threadIdx.x; e < size; e += kThreads) {
      const Key k = key_of(values[e], columns[e]);
      if (top_bits_equal<T>(k, prefix, 8 * pass)) atomicAdd(&sh.hist[digit<T>(k, pass)], 1u);
    }
    __syncthreads();
    select_digit<T>(sh, pass);
    if (pass == value_passes - 1 && sh.remaining == sh.in_bin) {  // the same for every thread
      const uint64_t boundary = sh.bar.hi;
      for (int e = threadIdx.x; e < size; e += kThreads) {
        const Key k = key_of(values[e], columns[e]);
        if (k.hi == boundary) atomicMin(&sh.min_lo, k.lo);
      }
      __syncthreads();
      if (threadIdx.x == 0) sh.bar.lo = sh.min_lo;
      __syncthreads();
      break;
    }
  }
  const Key bar = sh.bar;
  // Compact the entries >= bar (exactly `keep` of them) to the front.
  int out = 0;
  for (int base = 0; base < size; base += kThreads) {
    const int e = base + threadIdx.x;
    T v = T(0);
    int32_t col = 0;
    bool kept = false;
    if (e < size) {
      v = values[e];
      col = columns[e];
      kept = greater_equal(key_of(v, col), bar);
    }
    int total;
    const int offset = block_exclusive_scan(kept ? 1 : 0, sh.scan, &total);
    if (kept) {  // out + offset <= e: never over an entry not yet read
      values[out + offset] = v;
      columns[out + offset] = col;
    }
    out += total;
    __syncthreads();
  }
  return bar;
}

template <typename T>
__global__ void offer_tile_kernel(const T* tile, TileView view, int64_t block_r0, const T* scale,
                                  TopkValidity valid, TopkState<T> st) {
  __shared__ SelectShared sh;
  __shared__ int state_size, state_has_bar;
  const int64_t r = blockIdx.x;
  const int64_t row = view.r0 + r;        // global query row
  const int64_t slot = row - block_r0;    // row of the state buffers
  T* values = st.values + slot * st.cap;
  int32_t* columns = st.columns + slot * st.cap;
  if (threadIdx.x == 0) {
    state_size = st.size[slot];
    state_has_bar = st.has_bar[slot];
    sh.bar = Key{st.bar_hi[slot], st.bar_lo[slot]};
  }
  __syncthreads();
  const T* tile_row = tile + r * view.ld;
  const int64_t own_label = valid.q_labels ? valid.q_labels[row] : 0;
  for (int64_t base = 0; base < view.cols; base += kChunk) {
    if (state_size > st.cap - kChunk) {
      const Key bar = keep_best(values, columns, state_size, static_cast<int>(st.k), sh);
      if (threadIdx.x == 0) {
        state_size = static_cast<int>(st.k);
        state_has_bar = 1;
        sh.bar = bar;
      }
      __syncthreads();
    }
    const Key bar = sh.bar;
    const bool has_bar = state_has_bar != 0;
    T v[kPerThread];
    int32_t col[kPerThread];
    int count = 0;
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t c = base + u * kThreads + threadIdx.x;
      if (c >= view.cols) continue;
      const int64_t j = view.c0 + c;
      if (valid.exclude_self && j == row + valid.self_offset) continue;
      if (valid.q_labels && valid.c_labels[j] == own_label) continue;
      const T value = scale ? tile_row[c] * scale[j] : tile_row[c];
      if (has_bar && !greater(key_of(value, static_cast<int32_t>(j)), bar)) continue;
      v[count] = value;
      col[count] = static_cast<int32_t>(j);
      ++count;
    }
    int total;
    const int offset = block_exclusive_scan(count, sh.scan, &total);
    for (int u = 0; u < count; ++u) {
      values[state_size + offset + u] = v[u];
      columns[state_size + offset + u] = col[u];
    }
    __syncthreads();
    if (threadIdx.x == 0) state_size += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    st.size[slot] = state_size;
    st.has_bar[slot] = state_has_bar;
    st.bar_hi[slot] = sh.bar.hi;
    st.bar_lo[slot] = sh.bar.lo;
  }
}

// The tensor-core form (RELKD_TENSOR_CORES=1): a block owns 64 query rows,
// staged once in (dynamic) shared memory, and one of `splits` column
// ranges of the view, sweeps it 128 columns at a time (only those staged per
// step; OfferShape), the similarities computed by mma (pair_tile_mma.cuh) and
// filtered against each row's bar while they are in registers; only the
// survivors reach the rows' buffers (in an order set by integer atomics,
// which the unique composite keys make irrelevant to the result). A row
// whose buffer could overflow in the next sub-tile is compacted first, by
// the same exact selection. Each (row, split) has its own selection state,
// slot row * splits + split, so a few row blocks still fill the GPU;
// merge_splits_kernel then joins a row's splits for the finish.
// MmaWide: by default 64 x 128 with warps of 32 x 32, 2 down and 4 across
// (16 FLOP per byte read from shared memory where the square sub-tile's 16
// x 32 warps take 11; 32 accumulators per thread, as the top-k holds no
// teacher's).
using OfferShape = MmaWide;
constexpr size_t kOfferRingBytes = OfferShape::kColumnStageEntries * sizeof(uint16_t);

struct RowsState {
  Key bar[OfferShape::kRows];
  int size[OfferShape::kRows], has_bar[OfferShape::kRows];
};

template <typename Slot>
__device__ inline void compact_full_rows(RowsState& rs, SelectShared& sh,
                                         const TopkState<float>& st, int rows, const Slot& slot) {
  for (int r = 0; r < rows; ++r) {
    // Room for a whole sub-tile's columns; every thread reads the same size.
    if (rs.size[r] <= st.cap - OfferShape::kCols) continue;
    const Key bar = keep_best(st.values + slot(r) * st.cap, st.columns + slot(r) * st.cap,
                              rs.size[r], static_cast<int>(st.k), sh);
    if (threadIdx.x == 0) {
      rs.size[r] = static_cast<int>(st.k);
      rs.has_bar[r] = 1;
      rs.bar[r] = bar;
    }
    __syncthreads();
  }
}

// The columns of split `split` of `splits`: whole sub-tiles, the last split
// taking what is left.
__device__ inline void split_columns(const TileView& view, int splits, int split, int64_t* c0,
                                     int64_t* cols) {
  const int64_t tiles = (view.cols + OfferShape::kCols - 1) / OfferShape::kCols;
  const int64_t per_split = (tiles + splits - 1) / splits * OfferShape::kCols;
  const int64_t begin = split * per_split < view.cols ? split * per_split : view.cols;
  *c0 = view.c0 + begin;
  *cols = view.cols - begin < per_split ? view.cols - begin : per_split;
}

// Two blocks per multiprocessor: at most 128 registers (ptxas: 120-130
// without the bound, none spilled with it but 8 bytes of 3xTF32's on
// sm_80); D = 512 bf16 rows take 101 KiB of shared memory per block.
template <MmaOperands H>
__global__ void __launch_bounds__(kThreads, 2)
    offer_mma_kernel(const OperandEntry<H>* q, const OperandEntry<H>* c, int64_t d,
                     TileView view, int64_t block_r0, int splits, const float* scale,
                     TopkValidity valid, TopkState<float> st) {
  uint16_t* stage = dynamic_shared<uint16_t>();  // the columns' buffers, then the rows
  __shared__ SelectShared sh;
  __shared__ RowsState rs;
  const int split = static_cast<int>(blockIdx.x % splits);
  constexpr int kRows = OfferShape::kRows;
  const int64_t tr = static_cast<int64_t>(blockIdx.x / splits) * kRows;
  const int rows = static_cast<int>(view.rows - tr < kRows ? view.rows - tr : kRows);
  TileView mine = view;  // this block's columns
  split_columns(view, splits, split, &mine.c0, &mine.cols);
  // Row r's state is slot (row0 + r) * splits + split: `splits` slots apart.
  const int64_t slot0 = (view.r0 + tr - block_r0) * splits + split;
  auto slot = [&](int r) { return slot0 + static_cast<int64_t>(r) * splits; };
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    rs.size[r] = st.size[slot(r)];
    rs.has_bar[r] = st.has_bar[slot(r)];
    rs.bar[r] = Key{st.bar_hi[slot(r)], st.bar_lo[slot(r)]};
  }
  uint16_t* query_rows = stage + OfferShape::kColumnStageEntries;  // staged once for the sweep
  stage_resident_rows<H>(q, view.r0 + view.rows, d, view.r0 + tr, query_rows);
  for (int64_t tc = 0; tc < mine.cols; tc += OfferShape::kCols) {
    compact_full_rows(rs, sh, st, rows, slot);
    OfferShape::Acc acc = {};
    sub_tile_products_resident<H, OfferShape>(query_rows, c, d, mine, tc, stage, acc);
#pragma unroll
    for (int m = 0; m < OfferShape::kTilesM; ++m)
#pragma unroll
      for (int j = 0; j < OfferShape::kTilesN; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = OfferShape::entry_row(m, i);
          const int64_t col = mine.c0 + tc + OfferShape::entry_col(j, i);
          if (r >= rows || col >= mine.c0 + mine.cols) continue;
          const int64_t row = view.r0 + tr + r;
          if (valid.exclude_self && col == row + valid.self_offset) continue;
          if (valid.q_labels && valid.c_labels[col] == valid.q_labels[row]) continue;
          const float sim = acc_tile(acc, m, j)[i];
          const float value = scale ? sim * scale[col] : sim;
          if (rs.has_bar[r] && !greater(key_of(value, static_cast<int32_t>(col)), rs.bar[r]))
            continue;
          const int at = atomicAdd(&rs.size[r], 1);  // below cap: compacted above
          st.values[slot(r) * st.cap + at] = value;
          st.columns[slot(r) * st.cap + at] = static_cast<int32_t>(col);
        }
    __syncthreads();
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    st.size[slot(r)] = rs.size[r];
    st.has_bar[slot(r)] = rs.has_bar[r];
    st.bar_hi[slot(r)] = rs.bar[r].hi;
    st.bar_lo[slot(r)] = rs.bar[r].lo;
  }
}

// Joins row blockIdx.x's `splits` adjacent selections (slots row * splits
// + s, each st.cap long) into one list at the front of their buffers, its
// length into merged[row]: a row of the state with capacity splits * cap.
__global__ void merge_splits_kernel(TopkState<float> st, int splits, int32_t* merged) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * splits;
  float* values = st.values + first * st.cap;
  int32_t* columns = st.columns + first * st.cap;
  int64_t out = 0;
  for (int s = 0; s < splits; ++s) {
    const int64_t size = st.size[first + s], from = s * st.cap;
    // Every chunk is read before it is written, and out <= from: a move to
    // the left never overwrites an entry not yet read.
    for (int64_t base = 0; base < size; base += kThreads) {
      const int64_t e = base + threadIdx.x;
      const float v = e < size ? values[from + e] : 0.0f;
      const int32_t col = e < size ? columns[from + e] : 0;
      __syncthreads();
      if (e < size) {
        values[out + e] = v;
        columns[out + e] = col;
      }
      __syncthreads();
    }
    out += size;
  }
  if (threadIdx.x == 0) merged[blockIdx.x] = static_cast<int32_t>(out);
}

template <typename T>
__global__ void finish_kernel(TopkState<T> st, int64_t out_k, T* out_values,
                              int64_t* out_indices) {
  __shared__ SelectShared sh;
  const int64_t slot = blockIdx.x;
  T* values = st.values + slot * st.cap;
  int32_t* columns = st.columns + slot * st.cap;
  int size = st.size[slot];
  if (size > st.k) {
    keep_best(values, columns, size, static_cast<int>(st.k), sh);
    size = static_cast<int>(st.k);
  }
  // Rank of each kept pair = how many kept pairs beat it (keys are unique);
  // above kFinishRankMost pairs the caller sorts them instead.
  const bool rank_here = out_k <= kFinishRankMost;
  for (int e = threadIdx.x; e < size; e += kThreads) {
    int rank = e;
    if (rank_here) {
      const Key mine = key_of(values[e], columns[e]);
      rank = 0;
      for (int f = 0; f < size; ++f) rank += greater(key_of(values[f], columns[f]), mine);
    }
    out_values[slot * out_k + rank] = values[e];
    out_indices[slot * out_k + rank] = columns[e];
  }
  for (int64_t e = size + threadIdx.x; e < out_k; e += kThreads) {
    out_values[slot * out_k + e] = -INFINITY;
    out_indices[slot * out_k + e] = -1;
  }
}

template <typename T>
int offer(const T* tile, const TileView& view, int64_t block_r0, const T* scale,
          const TopkValidity& valid, const TopkState<T>& st, Stream stream) {
  if (view.rows == 0 || view.cols == 0) return 0;
  RELKD_LAUNCH(view.rows, kThreads, stream, offer_tile_kernel<T>)(tile, view, block_r0, scale,
                                                                  valid, st);
  return launched();
}

template <typename T>
int finish(const TopkState<T>& st, int64_t rows, int64_t out_k, T* values, int64_t* indices,
           Stream stream) {
  if (rows == 0) return 0;
  RELKD_LAUNCH(rows, kThreads, stream, finish_kernel<T>)(st, out_k, values, indices);
  return launched();
}

}  // namespace

int topk_offer_tile(const float* tile, const TileView& view, int64_t block_r0,
                    const float* scale, const TopkValidity& valid, const TopkState<float>& st,
                    Stream stream) {
  return offer(tile, view, block_r0, scale, valid, st, stream);
}

int topk_offer_tile(const double* tile, const TileView& view, int64_t block_r0,
                    const double* scale, const TopkValidity& valid,
                    const TopkState<double>& st, Stream stream) {
  return offer(tile, view, block_r0, scale, valid, st, stream);
}

// The offer kernel's dynamic shared memory: the columns' staging ring and
// the block's query rows.
template <MmaOperands H>
size_t offer_mma_dynamic_bytes(int64_t d) {
  return kOfferRingBytes + resident_rows_bytes<H>(d);
}

int topk_offer_mma(const void* q, const void* c, int64_t d, const TileView& view,
                   int64_t block_r0, int splits, const float* scale, const TopkValidity& valid,
                   const TopkState<float>& st, int32_t* merged, MmaOperands operands,
                   Stream stream) {
  if (view.rows == 0 || view.cols == 0) return 0;
  const int64_t blocks = blocks_for(view.rows, OfferShape::kRows) * splits;
  int offered = 0;
  with_operands(operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    const size_t bytes = offer_mma_dynamic_bytes<H>(d);
    offered = allow_dynamic_shared(offer_mma_kernel<H>, bytes);
    if (offered != 0) return;
    RELKD_LAUNCH_SHARED(blocks, kThreads, bytes, stream, offer_mma_kernel<H>)(
        entries<H>(q), entries<H>(c), d, view, block_r0, splits, scale, valid, st);
    // launched() clears the error it reports: keep it, and never join
    // selections a failed launch left unwritten.
    offered = launched();
  });
  if (splits == 1 || offered != 0) return offered;
  RELKD_LAUNCH(view.rows, kThreads, stream, merge_splits_kernel)(st, splits, merged);
  return launched();
}

bool topk_mma_fits(int device, int64_t d, MmaOperands operands) {
  size_t dynamic = 0, static_bytes = 0;
  with_operands(operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    dynamic = offer_mma_dynamic_bytes<H>(d);
#ifndef RELKD_EMULATE
    cudaFuncAttributes kernel;
    if (cudaFuncGetAttributes(&kernel, offer_mma_kernel<H>) == cudaSuccess) {
      static_bytes = kernel.sharedSizeBytes;
    } else {
      static_bytes = SIZE_MAX / 2;  // unknown: the tile path
      (void)cudaGetLastError();     // and no error left for a later launch's check
    }
#endif
  });
  // Emulated (static_bytes 0): the columns' ring and 32 KiB of query rows,
  // whatever the staging constants (D = 70 fits, D = 400 does not).
  return shared_memory_fits(device, dynamic + static_bytes, kOfferRingBytes + (32u << 10));
}

int topk_mma_splits(int device, int64_t rows, int64_t m, int64_t d, MmaOperands operands,
                    int64_t most) {
#ifdef RELKD_EMULATE
  (void)device;
  (void)d;
  (void)operands;
  const int64_t resident = 8, min_columns = 256;  // small tests split too
#else
  int processors = 1, per_processor = 1;
  if (cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    processors = 1;
  with_operands(operands, [&](auto format) {
    constexpr MmaOperands H = decltype(format)::value;
    const size_t bytes = offer_mma_dynamic_bytes<H>(d);
    // Blocks of `bytes` count only once the kernel may take them (the
    // launch sets the same); a failure leaves one block per multiprocessor
    // and no error behind for the launch's check.
    if (allow_dynamic_shared(offer_mma_kernel<H>, bytes) != 0 ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_processor, offer_mma_kernel<H>,
                                                      kThreads, bytes) != cudaSuccess) {
      per_processor = 1;
      (void)cudaGetLastError();
    }
  });
  const int64_t resident = int64_t(processors) * std::max(per_processor, 1);
  const int64_t min_columns = 8192;  // the bar prunes most of a split
#endif
  most = std::max<int64_t>(1, std::min<int64_t>({most, m / min_columns, 64}));
  return static_cast<int>(fullest_wave_splits(blocks_for(rows, OfferShape::kRows), resident, most));
}

int topk_finish(const TopkState<float>& st, int64_t rows, int64_t out_k, float* values,
                int64_t* indices, Stream stream) {
  return finish(st, rows, out_k, values, indices, stream);
}

int topk_finish(const TopkState<double>& st, int64_t rows, int64_t out_k, double* values,
                int64_t* indices, Stream stream) {
  return finish(st, rows, out_k, values, indices, stream);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

MmaTiling mma_tiling() {
  return {kMmaDepth,
          kStages,
          MmaWide::kCols,
          16 * MmaWide::kTilesM,
          8 * MmaWide::kTilesN,
          SelectShape::kRows,
          SelectShape::kCols,
          16 * SelectShape::kTilesM,
          8 * SelectShape::kTilesN};
}

}  // namespace cuda
}  // namespace relkd
