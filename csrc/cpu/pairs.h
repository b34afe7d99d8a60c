// Which (row, column) pairs an all-pairs op visits, and how tiles of pairs
// are enumerated. Shared by pairwise_loss and pair_select.
//
// Rows and columns carry ids (global sample indices: positions by default,
// rank offsets or a permutation under DDP) and optional labels. A mask is a
// predicate on an ordered pair (row i, column j).
//
// Symmetric case (columns are the rows): only tiles on or above the block
// diagonal are computed, and the unordered position pair {p, q}, p < q, gets
// weight m(p, q) + m(q, p); p == q gets m(p, p). A loss that is symmetric in
// (i, j) therefore sums exactly as over all ordered pairs, at half the cost.
#pragma once

#include <vector>

#include "common.h"

namespace relkd {

enum class Mask {
  All,             // every ordered pair, diagonal included (CCKD)
  OffDiagonal,     // id_i != id_j (RKD)
  UpperSameLabel,  // id_i < id_j, same label: positive pairs (EKD)
  UpperDiffLabel,  // id_i < id_j, labels differ: negative pairs (EKD)
};

struct PairIndex {
  const int64_t* ids_r = nullptr;  // nullptr: the position
  const int64_t* ids_c = nullptr;
  const int64_t* lab_r = nullptr;  // nullptr: no labels
  const int64_t* lab_c = nullptr;
  bool symmetric = false;

  int64_t id_r(int64_t p) const { return ids_r ? ids_r[p] : p; }
  int64_t id_c(int64_t q) const { return ids_c ? ids_c[q] : q; }
};

template <Mask M>
inline int ordered_mask(const PairIndex& ix, int64_t p, int64_t q) {
  switch (M) {
    case Mask::All:
      return 1;
    case Mask::OffDiagonal:
      return ix.id_r(p) != ix.id_c(q);
    case Mask::UpperSameLabel:
      return ix.id_r(p) < ix.id_c(q) && ix.lab_r[p] == ix.lab_c[q];
    case Mask::UpperDiffLabel:
      return ix.id_r(p) < ix.id_c(q) && ix.lab_r[p] != ix.lab_c[q];
  }
  return 0;
}

// Weight of the pair (row position p, column position q): 0, 1 or 2.
template <Mask M>
inline int pair_weight(const PairIndex& ix, int64_t p, int64_t q) {
  if (!ix.symmetric) return ordered_mask<M>(ix, p, q);
  if (q < p) return 0;
  if (q == p) return ordered_mask<M>(ix, p, p);
  return ordered_mask<M>(ix, p, q) + ordered_mask<M>(ix, q, p);
}

// ---------------------------------------------------------------- tiles
constexpr int64_t kPairTile = 256;  // rows = columns per tile

struct Tile {
  int64_t r0, rows, c0, cols;
};

// Range of ids and labels in one block of rows or columns, to skip whole
// tiles that hold no pair of the mask.
struct BlockRange {
  int64_t id_min, id_max, lab_min, lab_max;
};

inline std::vector<BlockRange> block_ranges(int64_t n, const int64_t* ids, const int64_t* labels) {
  std::vector<BlockRange> out;
  for (int64_t b0 = 0; b0 < n; b0 += kPairTile) {
    const int64_t b1 = std::min(n, b0 + kPairTile);
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
template <Mask M>
inline bool tile_may_have_pairs(const PairIndex& ix, const BlockRange& r, const BlockRange& c) {
  const bool upper = M == Mask::UpperSameLabel || M == Mask::UpperDiffLabel;
  // In the symmetric case a pair counts in either order, so ids never prune.
  if (upper && !ix.symmetric && r.id_min >= c.id_max) return false;
  if (M == Mask::UpperSameLabel && (r.lab_max < c.lab_min || c.lab_max < r.lab_min)) return false;
  if (M == Mask::UpperDiffLabel && r.lab_min == r.lab_max && c.lab_min == c.lab_max &&
      r.lab_min == c.lab_min)
    return false;
  return true;
}

// The tiles an op computes, skipping those the block ranges rule out.
template <Mask M>
std::vector<Tile> pair_tiles(const PairIndex& ix, int64_t n_r, int64_t n_c) {
  const auto rr = block_ranges(n_r, ix.ids_r, ix.lab_r);
  const auto cr = ix.symmetric ? rr : block_ranges(n_c, ix.ids_c, ix.lab_c);
  std::vector<Tile> tiles;
  for (size_t rb = 0; rb < rr.size(); ++rb)
    for (size_t cb = ix.symmetric ? rb : 0; cb < cr.size(); ++cb) {
      if (!tile_may_have_pairs<M>(ix, rr[rb], cr[cb])) continue;
      const int64_t r0 = rb * kPairTile, c0 = cb * kPairTile;
      tiles.push_back({r0, std::min(kPairTile, n_r - r0), c0, std::min(kPairTile, n_c - c0)});
    }
  return tiles;
}

// Fills w (rows x cols, row-major, leading dimension cols) with the tile's
// pair weights; returns whether any is nonzero.
template <Mask M, typename T>
bool tile_weights(const PairIndex& ix, const Tile& t, T* w) {
  bool any = false;
  for (int64_t r = 0; r < t.rows; ++r)
    for (int64_t c = 0; c < t.cols; ++c) {
      const int wt = pair_weight<M>(ix, t.r0 + r, t.c0 + c);
      w[r * t.cols + c] = T(wt);
      any |= wt != 0;
    }
  return any;
}

// Static assignment of tiles to lanes (round robin): each lane is processed
// by one thread and owns its accumulators, and lanes are reduced in order,
// so a result depends on the number of lanes but never on scheduling.
inline int64_t lane_count(size_t n_tiles) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
}

template <typename F>
void for_each_lane(int64_t lanes, F&& body) {
  parallel_below_autograd(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lane = begin; lane < end; ++lane) body(lane);
  });
}

// Scratch matrices of one tile, each rows x cols and contiguous: [0] the pair
// weights, [1] the dot products x_r x_c^T, [2..] free for the caller.
struct TileScratch {
  at::Tensor buf;
  const Tile* tile;
  at::Tensor operator[](int64_t k) const {
    return buf[k].narrow(0, 0, tile->rows * tile->cols).view({tile->rows, tile->cols});
  }
};

// Runs fn(lane, tile_index, scratch) for every tile holding at least one pair
// of the mask, after filling scratch[0] (weights) and scratch[1] (dots).
template <Mask M, typename T, typename F>
void visit_pair_tiles(const PairIndex& ix, const std::vector<Tile>& tiles, int64_t lanes,
                      const at::Tensor& x_r, const at::Tensor& x_c, int64_t n_scratch, F&& fn) {
  for_each_lane(lanes, [&](int64_t lane) {
    TileScratch scratch{at::empty({n_scratch, kPairTile * kPairTile}, x_r.options()), nullptr};
    for (size_t ti = lane; ti < tiles.size(); ti += lanes) {
      const Tile& t = tiles[ti];
      scratch.tile = &t;
      if (!tile_weights<M>(ix, t, scratch[0].template data_ptr<T>())) continue;
      at::Tensor dots = scratch[1];
      tile_dot(dots, x_r.narrow(0, t.r0, t.rows), x_c.narrow(0, t.c0, t.cols));
      fn(lane, ti, scratch);
    }
  });
}

}  // namespace relkd
