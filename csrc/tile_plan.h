// Which tiles of the (rows x columns) pair grid an all-pairs op computes, and
// in which order: host-side planning shared by the CPU kernels and the CUDA
// glue. Torch-free.
//
// Tiles are square blocks of `block` rows and columns. A tile is skipped when
// the id / label ranges of its row and column blocks prove it holds no pair
// of the mask. Tiles are grouped into *waves*: within a wave no two tiles
// touch the same row block or the same column block (in the symmetric case,
// the same block in either role), so the tiles of a wave can add their
// gradient contributions to their blocks in parallel without races, and the
// waves come in a fixed order. The sum each gradient row receives is then
// added in the same order for any number of threads and any scheduling:
// bitwise reproducible, with one gradient buffer instead of one per thread.
// The CUDA glue launches wave after wave; the CPU kernels need no barrier
// between waves (order_by_block below).
#pragma once

#include <stdint.h>

#include <algorithm>
#include <vector>

#include "pair_math.h"

namespace relkd {

struct Tile {
  int64_t r0, rows, c0, cols;
  int64_t rb, cb;  // block indices
};

// Range of ids and labels in one block of rows or columns.
struct BlockRange {
  int64_t id_min, id_max, lab_min, lab_max;
};

// Block ranges of n entries with optional ids (nullptr: the position) and
// labels (nullptr: none), from host arrays.
inline std::vector<BlockRange> block_ranges(int64_t n, int64_t block, const int64_t* ids,
                                            const int64_t* labels) {
  std::vector<BlockRange> out;
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(n, b0 + block);
    BlockRange r{INT64_MAX, INT64_MIN, INT64_MAX, INT64_MIN};
    for (int64_t p = b0; p < b1; ++p) {
      const int64_t id = ids ? ids[p] : p;
      r.id_min = std::min(r.id_min, id);
      r.id_max = std::max(r.id_max, id);
      if (labels) {
        r.lab_min = std::min(r.lab_min, labels[p]);
        r.lab_max = std::max(r.lab_max, labels[p]);
      }
    }
    out.push_back(r);
  }
  return out;
}

// False only where the ranges prove the tile holds no pair of the mask.
inline bool tile_may_have_pairs(pm::Mask m, bool symmetric, const BlockRange& r,
                                const BlockRange& c) {
  const bool upper = m == pm::Mask::UpperSameLabel || m == pm::Mask::UpperDiffLabel;
  // In the symmetric case a pair counts in either order, so ids never prune.
  if (upper && !symmetric && r.id_min >= c.id_max) return false;
  if (m == pm::Mask::UpperSameLabel && (r.lab_max < c.lab_min || c.lab_max < r.lab_min))
    return false;
  if (m == pm::Mask::UpperDiffLabel && r.lab_min == r.lab_max && c.lab_min == c.lab_max &&
      r.lab_min == c.lab_min)
    return false;
  return true;
}

// The tiles an op computes (symmetric: blocks rb <= cb only), row-major.
inline std::vector<Tile> plan_tiles(pm::Mask m, bool symmetric, int64_t block, int64_t n_r,
                                    int64_t n_c, const std::vector<BlockRange>& rr,
                                    const std::vector<BlockRange>& cr) {
  std::vector<Tile> tiles;
  for (int64_t rb = 0; rb < (int64_t)rr.size(); ++rb)
    for (int64_t cb = symmetric ? rb : 0; cb < (int64_t)cr.size(); ++cb) {
      if (!tile_may_have_pairs(m, symmetric, rr[rb], cr[cb])) continue;
      const int64_t r0 = rb * block, c0 = cb * block;
      tiles.push_back({r0, std::min(block, n_r - r0), c0, std::min(block, n_c - c0), rb, cb});
    }
  return tiles;
}

// Wave of a tile. Rectangular (disjoint row and column blocks): (cb - rb)
// mod max(B_r, B_c) puts each row block and each column block at most once in
// a wave. Symmetric (B blocks, rb <= cb, a tile touches blocks rb and cb):
// the circle method of round-robin tournaments. With m = B for odd B, the
// off-diagonal tile {a, b} plays in round (a + b) mod m, which is a matching;
// block a sits out round 2a mod m, where its diagonal tile goes. With even B,
// m = B - 1 and block B - 1 plays the block that would sit out; diagonal
// tiles then get a round of their own, m.
inline int64_t wave_of(const Tile& t, bool symmetric, int64_t blocks_r, int64_t blocks_c) {
  if (!symmetric) {
    const int64_t b = std::max(blocks_r, blocks_c);
    return ((t.cb - t.rb) % b + b) % b;
  }
  const int64_t blocks = blocks_r;
  const int64_t a = t.rb, b = t.cb;
  if (blocks % 2 == 1) return a == b ? (2 * a) % blocks : (a + b) % blocks;
  const int64_t m = blocks - 1;
  if (a == b) return m;
  if (b == blocks - 1) return (2 * a) % m;
  return (a + b) % m;
}

// Tile indices grouped by wave, waves in order, tiles in row-major order
// within a wave; empty waves dropped.
inline std::vector<std::vector<int64_t>> group_by_wave(const std::vector<Tile>& tiles,
                                                       bool symmetric, int64_t blocks_r,
                                                       int64_t blocks_c) {
  const int64_t n_waves = symmetric ? std::max<int64_t>(blocks_r, 1)
                                    : std::max<int64_t>({blocks_r, blocks_c, int64_t(1)});
  std::vector<std::vector<int64_t>> waves(n_waves);
  for (int64_t i = 0; i < (int64_t)tiles.size(); ++i)
    waves[wave_of(tiles[i], symmetric, blocks_r, blocks_c)].push_back(i);
  waves.erase(std::remove_if(waves.begin(), waves.end(),
                             [](const std::vector<int64_t>& w) { return w.empty(); }),
              waves.end());
  return waves;
}

// The tiles in wave order, each with the blocks it updates (rectangular:
// row block rb and column block B_r + cb; symmetric: rb and cb, one block on
// the diagonal) and, per block, how many tiles before it in that order update
// the block too. A CPU worker may start a tile once that many tiles of each
// of its blocks are done: each block then meets its tiles in wave order
// whatever the scheduling, without a barrier between the waves.
struct OrderedTile {
  int64_t tile;
  int64_t block[2];  // block[1] < 0: a symmetric diagonal tile (one block)
  int64_t turn[2];   // tiles of block[j] that come first
};

inline std::vector<OrderedTile> order_by_block(const std::vector<Tile>& tiles,
                                               const std::vector<std::vector<int64_t>>& waves,
                                               bool symmetric, int64_t blocks_r,
                                               int64_t blocks_c) {
  std::vector<int64_t> seen(symmetric ? blocks_r : blocks_r + blocks_c, 0);
  std::vector<OrderedTile> order;
  order.reserve(tiles.size());
  for (const auto& wave : waves)
    for (const int64_t ti : wave) {
      const Tile& t = tiles[ti];
      OrderedTile o{ti, {t.rb, symmetric ? t.cb : blocks_r + t.cb}, {0, 0}};
      if (symmetric && t.rb == t.cb) o.block[1] = -1;
      for (int j = 0; j < 2; ++j)
        if (o.block[j] >= 0) o.turn[j] = seen[o.block[j]]++;
      order.push_back(o);
    }
  return order;
}

// How many column ranges (1 .. most) a top-k cuts its bank into when
// `row_blocks` blocks of query rows each sweep one range, on a GPU that runs
// `resident` blocks at once: the fewest whose blocks fill their last wave
// to within a fraction kWaveSlack of the best count's fill. The blocks are
// equal, so a last wave 45 % full costs as long as a full one (128 row
// blocks on 264 places: 2 ranges fill 97 %, 3 only 73 %); each range adds a
// selection to merge. A relative slack: with a few row blocks every count
// leaves the wave mostly empty, and the most ranges fill it best.
constexpr double kWaveSlack = 0.05;

inline double last_wave_fill(int64_t blocks, int64_t resident) {
  const int64_t waves = (blocks + resident - 1) / resident;
  return static_cast<double>(blocks) / static_cast<double>(waves * resident);
}

inline int64_t fullest_wave_splits(int64_t row_blocks, int64_t resident, int64_t most) {
  row_blocks = std::max<int64_t>(row_blocks, 1);
  resident = std::max<int64_t>(resident, 1);
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s)
    best = std::max(best, last_wave_fill(row_blocks * s, resident));
  int64_t s = 1;
  while (s < most && last_wave_fill(row_blocks * s, resident) < best * (1.0 - kWaveSlack)) ++s;
  return s;
}

}  // namespace relkd
