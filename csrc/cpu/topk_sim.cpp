// topk_sim on CPU: exact k-nearest-neighbour search by inner product.
//
// Work is split into (row block, column range) items. Each item keeps a
// bounded selection per row, walks its column range one GEMM tile at a time
// and offers the tile to the selections; those of the column ranges of a row
// are merged at the end. Peak extra memory: the candidate buffers (O(N*k)
// per column range) plus one tile per thread, never N x M.
#include <algorithm>
#include <functional>
#include <vector>

#include "../tile_plan.h"
#include "chunk_test.h"
#include "common.h"

namespace relkd {
namespace {

constexpr int64_t kRowBlock = 256;      // query rows per work item
constexpr int64_t kMaxTileCols = 4096;  // columns per scanned tile, at most
constexpr int64_t kGemmCols = 1024;     // columns per GEMM call
constexpr int64_t kItemsPerThread = 2;  // split columns when there are fewer row blocks
constexpr int64_t kCandidateBytes = int64_t(64) << 20;  // bound of the split buffers
using chunk::kChunk;                    // values tested against the threshold at once

// Column ranges per row block: enough work items for every thread to take
// kItemsPerThread when there are few query rows (so a busy core can take
// fewer), but no more, since every range pays its own warm-up of the
// selection and a merge; and never more candidate memory (splits x n x 2k
// pairs) than kCandidateBytes beyond one split. The split may depend on the
// thread count without changing any result: the tiles a value is computed
// in do not depend on it, and the selection is exact under a total order
// (value, then index), so any split gives the same k pairs.
int64_t column_splits(int64_t n, int64_t row_blocks, int64_t col_tiles, int64_t k_buf,
                      int64_t pair_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t wanted = std::max<int64_t>(1, ceil_div(kItemsPerThread * threads, row_blocks));
  const int64_t per_split = std::max<int64_t>(1, n * 2 * k_buf * pair_bytes);
  const int64_t affordable = std::max<int64_t>(1, kCandidateBytes / per_split);
  return std::max<int64_t>(1, std::min({col_tiles, wanted, affordable}));
}

// Runtime-dispatched SIMD clones of the filter: the build stays portable
// (no -march) and AVX2 / AVX-512 machines still get wide comparisons.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RELKD_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RELKD_SIMD_CLONES
#endif

// Start of the first chunk of kChunk values in [begin, n) that holds a value
// above thr (each value times scale[t] when scale is given), or the start of
// the tail shorter than a chunk (packed compares within a chunk).
template <typename T>
inline int64_t find_chunk_above_impl(const T* row, const T* scale, int64_t begin, int64_t n,
                                     T thr) {
  int64_t t = begin;
  for (; t + kChunk <= n; t += kChunk) {
    if (scale ? chunk::any_scaled_above(row + t, scale + t, thr) : chunk::any_above(row + t, thr))
      return t;
  }
  return t;
}

RELKD_SIMD_CLONES int64_t find_chunk_above(const float* row, const float* scale, int64_t begin,
                                           int64_t n, float thr) {
  return find_chunk_above_impl(row, scale, begin, n, thr);
}

RELKD_SIMD_CLONES int64_t find_chunk_above(const double* row, const double* scale,
                                           int64_t begin, int64_t n, double thr) {
  return find_chunk_above_impl(row, scale, begin, n, thr);
}

// Writes the values of row[0, n) that are >= bound, and their positions, to
// values and positions in order; returns how many. Chunks without one are
// skipped by a packed compare, the others compacted without branches.
// values may be row itself (a value is never written past where it is read).
template <typename T>
inline int64_t compact_at_least_impl(const T* row, int64_t n, T bound, T* values,
                                     int64_t* positions) {
  int64_t kept = 0, t = 0;
  for (; t < n; t += kChunk) {
    const int64_t stop = std::min(n, t + kChunk);
    if (stop - t == kChunk && !chunk::any_at_least(row + t, bound)) continue;
    for (int64_t u = t; u < stop; ++u) {
      values[kept] = row[u];
      positions[kept] = u;
      kept += row[u] >= bound;
    }
  }
  return kept;
}

RELKD_SIMD_CLONES int64_t compact_at_least(const float* row, int64_t n, float bound,
                                           float* values, int64_t* positions) {
  return compact_at_least_impl(row, n, bound, values, positions);
}

RELKD_SIMD_CLONES int64_t compact_at_least(const double* row, int64_t n, double bound,
                                           double* values, int64_t* positions) {
  return compact_at_least_impl(row, n, bound, values, positions);
}

template <typename T>
inline bool has_nan_impl(const T* v, int64_t n) {
  int64_t t = 0;
  for (; t + kChunk <= n; t += kChunk)
    if (chunk::any_nan(v + t)) return true;
  for (; t < n; ++t)
    if (v[t] != v[t]) return true;
  return false;
}

RELKD_SIMD_CLONES bool has_nan(const float* v, int64_t n) { return has_nan_impl(v, n); }
RELKD_SIMD_CLONES bool has_nan(const double* v, int64_t n) { return has_nan_impl(v, n); }

// out[l] = max_r v[r * k + l] over the rows r < rows of v viewed as a
// (rows x k) matrix: lane-wise, so it vectorises.
template <typename T>
inline void column_max_impl(const T* v, int64_t rows, int64_t k, T* out) {
  std::copy(v, v + k, out);
  for (int64_t r = 1; r < rows; ++r)
    for (int64_t l = 0; l < k; ++l) out[l] = v[r * k + l] > out[l] ? v[r * k + l] : out[l];
}

RELKD_SIMD_CLONES void column_max(const float* v, int64_t rows, int64_t k, float* out) {
  column_max_impl(v, rows, k, out);
}

RELKD_SIMD_CLONES void column_max(const double* v, int64_t rows, int64_t k, double* out) {
  column_max_impl(v, rows, k, out);
}

// The best k (value, index) pairs a row has seen so far. Accepted pairs are
// appended to a buffer of 2k; when it fills, nth_element keeps the best k
// and their worst becomes the bar a newcomer must beat. That is amortised
// O(1) per accepted pair, where a heap pays O(log k) branchy sifts.
template <typename T>
struct RowSelect {
  std::pair<T, int64_t>* buf;  // capacity 2k
  int64_t size;
  int64_t k;
  bool has_bar;  // false until the first compaction: every valid pair is accepted
  T bar_v;
  int64_t bar_j;

  // A function object, not a function pointer, so that nth_element and
  // sort inline the comparison.
  struct Better {
    bool operator()(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) const {
      return ranks_below(b.first, b.second, a.first, a.second);
    }
  };

  // A value above this beats the bar (scan_row offers every value while
  // the bar is NaN, so it is a number here).
  T threshold() const { return bar_v; }

  void offer(T v, int64_t j) {
    if (has_bar && !ranks_below(bar_v, bar_j, v, j)) return;
    buf[size++] = {v, j};
    if (size == 2 * k) keep_best();
  }

  // Fills an empty selection from a whole tile row of n > 2k values at once,
  // so the bar starts at the row's k-th best instead of the k-th of its first
  // 2k values and fewer later values pass the filter. A cheap lower bound
  // of the k-th best value leaves a few k candidates; nth_element over their
  // plain values (cheaper than over pairs) finds the k-th best, and the
  // candidates above it, then those equal to it in index order (the tie
  // rule), fill the selection. `plain`: every value of the row is valid and
  // unscaled (value(t) == row[t]), so the row is read directly, in packed
  // chunks, and the candidates keep their positions; otherwise the valid
  // values are copied first and the row is walked again. scratch holds >= n
  // values, positions >= n indices. A row holding NaN takes the pair-by-pair
  // path: returns false, nothing done.
  template <typename Value, typename Valid>
  bool seed(const T* row, bool plain, int64_t n, int64_t c0, const Value& value,
            const Valid& valid, T* scratch, int64_t* positions) {
    int64_t count = 0;
    if (plain) {
      if (has_nan(row, n)) return false;
      count = compact_at_least(row, n, kth_lower_bound(row, n, k), scratch, positions);
    } else {
      bool nan = false;
      for (int64_t t = 0; t < n; ++t) {
        if (!valid(c0 + t)) continue;
        const T v = value(t);
        nan |= std::isnan(v);
        scratch[count++] = v;
      }
      if (nan) return false;
      if (count <= k) {  // every valid pair fits: no bar yet
        for (int64_t t = 0; t < n; ++t)
          if (valid(c0 + t)) buf[size++] = {value(t), c0 + t};
        return true;
      }
      // In place (each value is written at or before where it was read);
      // the positions, within scratch, go unused: the pass below walks the row.
      count = compact_at_least(scratch, count, kth_lower_bound(scratch, count, k), scratch,
                               positions);
    }
    // Candidates in index order, for the pass below (nth_element reorders scratch).
    const int64_t candidates = count;
    std::nth_element(scratch, scratch + k - 1, scratch + count, std::greater<T>());
    const T kth = scratch[k - 1];
    // The values above kth all lie in scratch[0, k - 1); the rest of the k
    // are ties at kth, taken in index order (one pass for both).
    int64_t ties = k;
    for (int64_t e = 0; e < k; ++e) ties -= scratch[e] > kth;
    bar_j = -1;
    auto take = [&](int64_t t) {
      const T v = value(t);
      if (v < kth || (v == kth && ties == 0) || !valid(c0 + t)) return;
      buf[size++] = {v, c0 + t};
      if (v == kth) {
        --ties;
        bar_j = c0 + t;  // the worst kept pair: value kth, the largest index taken at it
      }
    };
    if (plain) {
      for (int64_t e = 0; e < candidates; ++e) take(positions[e]);
    } else {
      for (int64_t t = 0; t < n; ++t) take(t);
    }
    has_bar = true;
    bar_v = kth;
    return true;
  }

  // A value at most the k-th largest of v[0, count) (count > k, no NaN)
  // that leaves only a few k values at or above it (defined below).
  static T kth_lower_bound(const T* v, int64_t count, int64_t k);

  // Keeps the best min(size, k) pairs (unordered) and sets the bar.
  void keep_best() {
    if (size <= k) return;
    std::nth_element(buf, buf + k - 1, buf + size, Better());
    size = k;
    has_bar = true;
    bar_v = buf[k - 1].first;
    bar_j = buf[k - 1].second;
  }
};

struct Validity {
  const int64_t* q_labels;  // nullptr: no label exclusion
  const int64_t* c_labels;
  bool exclude_self;
  int64_t self_offset;

  bool operator()(int64_t i, int64_t j) const {
    if (exclude_self && j == i + self_offset) return false;
    if (q_labels && c_labels && q_labels[i] == c_labels[j]) return false;
    return true;
  }

  // Whether row i keeps every column of [c0, c0 + n).
  bool all_valid(int64_t i, int64_t c0, int64_t n) const {
    if (q_labels && c_labels) return false;
    return !exclude_self || i + self_offset < c0 || i + self_offset >= c0 + n;
  }
};

// The maxima of L > k disjoint groups (v[l], v[L + l], v[2L + l], ... for
// each lane l) are L of the values, so the k-th largest value is at least
// the k-th largest of them. L = 2k keeps about 3 % of a row of 4096 values
// for k = 100, against 11 % for the least of k maxima; at least kMinLanes
// lanes, since a few long lanes would be scalar chains (k = 1: one lane).
template <typename T>
T RowSelect<T>::kth_lower_bound(const T* v, int64_t count, int64_t k) {
  constexpr int64_t kMinLanes = 32;
  const int64_t lanes = std::min(count, std::max(2 * k, kMinLanes));
  thread_local std::vector<T> maxima;
  maxima.resize(lanes);
  column_max(v, count / lanes, lanes, maxima.data());
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<T>());
  return maxima[k - 1];
}

// A worker's buffers for RowSelect::seed, for tile rows of up to n values.
template <typename T>
struct SeedScratch {
  std::vector<T> values;
  std::vector<int64_t> positions;
  void resize(int64_t n) {
    values.resize(n);
    positions.resize(n);
  }
};

// Offers one tile row (columns c0 .. c0 + n of the bank, values scaled by
// scale[c0 + t] when given) to a row's selection. Until the selection has a
// bar every valid value is offered; then whole chunks below the bar are
// skipped by find_chunk_above and only chunks with a candidate are examined.
template <typename T>
void scan_row(RowSelect<T>& sel, const T* row, const T* scale, int64_t n, int64_t i,
              int64_t c0, const Validity& valid, SeedScratch<T>& scratch) {
  const T* sc = scale ? scale + c0 : nullptr;
  auto value = [&](int64_t t) { return sc ? row[t] * sc[t] : row[t]; };
  int64_t t = 0;
  const bool plain = !sc && valid.all_valid(i, c0, n);
  if (sel.size == 0 && !sel.has_bar && n > 2 * sel.k &&
      sel.seed(row, plain, n, c0, value, [&](int64_t j) { return valid(i, j); },
               scratch.values.data(), scratch.positions.data()))
    t = n;
  // Until there is a bar, and while it is NaN (fewer than k numbers so far,
  // and -inf still beats it), every valid value is offered.
  for (; t < n && (!sel.has_bar || std::isnan(sel.bar_v)); ++t) {
    if (valid(i, c0 + t)) sel.offer(value(t), c0 + t);
  }
  while (t < n) {
    const T thr = sel.threshold();
    t = find_chunk_above(row, sc, t, n, thr);
    const int64_t stop = std::min(n, t + kChunk);  // one chunk, or the tail
    for (; t < stop; ++t) {
      const T v = value(t);
      if (v > thr && valid(i, c0 + t)) sel.offer(v, c0 + t);
    }
  }
}

// Sorts a row's candidates best first and writes the best k, padded with
// (-inf, -1).
template <typename T>
void write_best(std::pair<T, int64_t>* cand, int64_t size, int64_t k, T* out_v, int64_t* out_i) {
  std::sort(cand, cand + size, typename RowSelect<T>::Better());
  const int64_t kept = std::min<int64_t>(k, size);
  for (int64_t e = 0; e < k; ++e) {
    out_v[e] = e < kept ? cand[e].first : -std::numeric_limits<T>::infinity();
    out_i[e] = e < kept ? cand[e].second : -1;
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> topk_sim_impl(const at::Tensor& q, const at::Tensor& c, int64_t k,
                                                 const at::Tensor& q_labels,
                                                 const at::Tensor& c_labels,
                                                 const at::Tensor& c_scale, bool exclude_self,
                                                 int64_t self_offset) {
  const int64_t n = q.size(0), m = c.size(0);
  auto values = at::empty({n, k}, q.options());
  auto indices = at::empty({n, k}, q.options().dtype(at::kLong));
  if (n == 0) return {values, indices};

  // Buffers hold at most min(k, m) pairs per row: a k beyond the bank only pads.
  const int64_t k_buf = std::min(k, m);
  const int64_t row_blocks = ceil_div(n, kRowBlock);
  // Wide first tiles: a row's selection is seeded from the k-th best of the
  // whole first tile row, so the wider it is, the fewer values of later
  // tiles beat the bar and take the pair-by-pair path (a bank of up to
  // kMaxTileCols columns is seeded once, exactly). The tile (kRowBlock x
  // kMaxTileCols, 4 MiB of float32 per thread) is filled by GEMMs of
  // kGemmCols columns: MKL ran 256 x 1024 products 20-40 % faster than
  // 64 x 4096 ones here.
  const int64_t tile_cols = std::min(std::max<int64_t>(m, 1), kMaxTileCols);
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(m, tile_cols));
  const int64_t splits = column_splits(n, row_blocks, col_tiles, k_buf, sizeof(std::pair<T, int64_t>));
  const int64_t tiles_per_split = ceil_div(col_tiles, splits);

  // candidate buffers: [split][row][2 k_buf]
  std::vector<std::pair<T, int64_t>> cand_buf(static_cast<size_t>(splits * n * 2 * k_buf));
  std::vector<int64_t> cand_size(static_cast<size_t>(splits * n), 0);

  const Validity valid{data_or_null(q_labels), data_or_null(c_labels), exclude_self, self_offset};
  const T* scale = c_scale.defined() ? c_scale.data_ptr<T>() : nullptr;

  T* out_val = values.data_ptr<T>();
  int64_t* out_idx = indices.data_ptr<int64_t>();
  const int64_t items = k_buf > 0 ? row_blocks * splits : 0;
  const int64_t slots = worker_slots(items);
  std::vector<at::Tensor> tiles(slots);
  std::vector<SeedScratch<T>> scratch(slots);
  parallel_items(items, slots, [&](int64_t slot, int64_t item) {
    if (!tiles[slot].defined()) {
      tiles[slot] = at::empty({kRowBlock, tile_cols}, q.options());
      scratch[slot].resize(tile_cols);
    }
    const int64_t rb = item / splits, split = item % splits;
    const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, n - r0);
    const int64_t tile_begin = split * tiles_per_split;
    const int64_t tile_end = std::min(col_tiles, tile_begin + tiles_per_split);
    std::vector<RowSelect<T>> sels(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t cand_slot = split * n + r0 + r;
      sels[r] = RowSelect<T>{cand_buf.data() + cand_slot * 2 * k_buf, 0, k_buf, false, T(0), 0};
    }
    const auto q_blk = q.narrow(0, r0, rows);
    for (int64_t ct = tile_begin; ct < tile_end; ++ct) {
      const int64_t c0 = ct * tile_cols, cols = std::min(tile_cols, m - c0);
      if (cols <= 0) break;
      // The item's first tile is scanned whole (its rows seed the
      // selections); later ones kGemmCols columns at a time, each piece
      // scanned while it is still in L2.
      const int64_t step = ct == tile_begin ? cols : kGemmCols;
      for (int64_t p = 0; p < cols; p += step) {
        const int64_t width = std::min(step, cols - p);
        auto out = tiles[slot].narrow(0, 0, rows).narrow(1, 0, width);
        for (int64_t g = 0; g < width; g += kGemmCols) {
          const int64_t piece_cols = std::min(kGemmCols, width - g);
          auto piece = out.narrow(1, g, piece_cols);
          tile_dot(piece, q_blk, c.narrow(0, c0 + p + g, piece_cols));
        }
        T* base = out.data_ptr<T>();
        const int64_t ld = out.stride(0);
        for (int64_t r = 0; r < rows; ++r)
          scan_row(sels[r], base + r * ld, scale, width, r0 + r, c0 + p, valid, scratch[slot]);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      sels[r].keep_best();
      cand_size[split * n + r0 + r] = sels[r].size;
      // One column range: the row's selection is final, written here while
      // it is in cache (and no second parallel region is needed).
      if (splits == 1)
        write_best(sels[r].buf, sels[r].size, k, out_val + (r0 + r) * k,
                   out_idx + (r0 + r) * k);
    }
  });
  if (splits == 1 && k_buf > 0) return {values, indices};

  // Merge the column ranges of every row: best first, then padding.
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<T, int64_t>> cand;
    for (int64_t i = begin; i < end; ++i) {
      cand.clear();
      for (int64_t s = 0; s < splits; ++s) {
        const int64_t slot = s * n + i;
        cand.insert(cand.end(), cand_buf.begin() + slot * 2 * k_buf,
                    cand_buf.begin() + slot * 2 * k_buf + cand_size[slot]);
      }
      write_best(cand.data(), cand.size(), k, out_val + i * k, out_idx + i * k);
    }
  });
  return {values, indices};
}

// --------------------------------------------------------- symmetric top-k
// topk_sim_symmetric(x, k, labels): every row's best k among the other rows
// of x (of another label, when labels are given),
// each product x_i . x_j computed once: tiles (i, j) with block i <= j feed
// the rows of block i and, transposed, those of block j. Every row keeps one
// selection for the whole search (O(n k) memory), so its bar stays as strong
// as in a plain search. Tiles run in the block order of tile_plan.h and
// common.h (parallel_in_block_order), so each selection has one writer at a
// time and meets its tiles in a fixed order.
// Blocks of 1024 rows; 512 up to 8192 rows, so that a training batch still
// has enough blocks for several tiles at a time. A function of n only: the
// tiles a product is computed in never depend on the thread count.
int64_t symmetric_block(int64_t n) { return n <= 8192 ? 512 : 1024; }

template <typename T>
std::tuple<at::Tensor, at::Tensor> symmetric_impl(const at::Tensor& x, int64_t k,
                                                  const at::Tensor& labels) {
  const int64_t n = x.size(0);
  const int64_t block = symmetric_block(n);
  const int64_t k_buf = std::min(k, std::max<int64_t>(n - 1, 0));
  std::vector<std::pair<T, int64_t>> buf(n * 2 * k_buf);
  std::vector<RowSelect<T>> sel(n);
  for (int64_t i = 0; i < n; ++i)
    sel[i] = RowSelect<T>{buf.data() + i * 2 * k_buf, 0, k_buf, false, T(0), 0};

  const auto ranges = block_ranges(n, block, nullptr, nullptr);
  const auto tiles = plan_tiles(pm::Mask::OffDiagonal, true, block, n, n, ranges, ranges);
  const int64_t blocks = ranges.size();
  const auto waves = k_buf > 0 ? group_by_wave(tiles, true, blocks, blocks)
                               : std::vector<std::vector<int64_t>>{};
  const int64_t slots = worker_slots(ceil_div(blocks + 1, 2));
  const int64_t* lab = data_or_null(labels);
  const Validity valid{lab, lab, true, 0};
  std::vector<at::Tensor> products(slots), flipped(slots);
  std::vector<SeedScratch<T>> scratch(slots);
  const auto order = order_by_block(tiles, waves, true, blocks, blocks);
  parallel_in_block_order(order, blocks, slots, [&](int64_t slot, int64_t tile_index) {
    if (!products[slot].defined()) {
      products[slot] = at::empty({block, block}, x.options());
      flipped[slot] = at::empty({block, block}, x.options());
      scratch[slot].resize(block);
    }
    const Tile& tile = tiles[tile_index];
    const int64_t r0 = tile.r0, rows = tile.rows, c0 = tile.c0, cols = tile.cols;
    auto out = products[slot].narrow(0, 0, rows).narrow(1, 0, cols);
    tile_dot(out, x.narrow(0, r0, rows), x.narrow(0, c0, cols));
    const T* base = out.data_ptr<T>();
    const T* no_scale = nullptr;
    for (int64_t r = 0; r < rows; ++r)
      scan_row(sel[r0 + r], base + r * out.stride(0), no_scale, cols, r0 + r, c0, valid,
               scratch[slot]);
    if (tile.rb == tile.cb) return;  // the diagonal tile holds both directions already
    auto out_t = flipped[slot].narrow(0, 0, cols).narrow(1, 0, rows);
    out_t.copy_(out.t());
    const T* base_t = out_t.data_ptr<T>();
    for (int64_t c = 0; c < cols; ++c)
      scan_row(sel[c0 + c], base_t + c * out_t.stride(0), no_scale, rows, c0 + c, r0, valid,
               scratch[slot]);
  });

  auto values = at::empty({n, k}, x.options());
  auto indices = at::empty({n, k}, x.options().dtype(at::kLong));
  T* v = values.data_ptr<T>();
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      sel[i].keep_best();
      write_best(sel[i].buf, sel[i].size, k, v + i * k, idx + i * k);
    }
  });
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> topk_sim_symmetric_cpu(
    const at::Tensor& x, int64_t k, const c10::optional<at::Tensor>& labels) {
  BelowAutograd below_autograd;
  check_topk_sim_args(x, x, k, labels, labels, c10::nullopt);
  const auto xc = x.contiguous();
  const auto lab = contiguous_or_empty(labels);
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_sim_symmetric",
                                    [&] { return symmetric_impl<scalar_t>(xc, k, lab); });
}

std::tuple<at::Tensor, at::Tensor> topk_sim_cpu(const at::Tensor& q, const at::Tensor& c, int64_t k,
                                                const c10::optional<at::Tensor>& q_labels,
                                                const c10::optional<at::Tensor>& c_labels,
                                                const c10::optional<at::Tensor>& c_scale,
                                                bool exclude_self, int64_t self_offset) {
  BelowAutograd below_autograd;
  check_topk_sim_args(q, c, k, q_labels, c_labels, c_scale);
  const auto qc = q.contiguous(), cc = c.contiguous();
  const auto ql = contiguous_or_empty(q_labels), cl = contiguous_or_empty(c_labels);
  const auto sc = contiguous_or_empty(c_scale);
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "topk_sim", [&] {
    return topk_sim_impl<scalar_t>(qc, cc, k, ql, cl, sc, exclude_self, self_offset);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("topk_sim", &topk_sim_cpu);
  m.impl("topk_sim_symmetric", &topk_sim_symmetric_cpu);
}

}  // namespace relkd
