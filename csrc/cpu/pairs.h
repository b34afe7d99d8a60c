// Which (row, column) pairs an all-pairs op visits, and how its tiles are
// computed on the CPU. Shared by pairwise_loss and pair_select; the masks
// and pair weights are those of csrc/pair_math.h, the tile plan (pruning,
// waves) that of csrc/tile_plan.h.
//
// Rows and columns carry ids (global sample indices: positions by default,
// rank offsets or a permutation under DDP) and optional labels.
#pragma once

#include <vector>

#include "../tile_plan.h"
#include "common.h"

namespace relkd {

using pm::Mask;

struct PairIndex {
  const int64_t* ids_r = nullptr;  // nullptr: the position
  const int64_t* ids_c = nullptr;
  const int64_t* lab_r = nullptr;  // nullptr: no labels
  const int64_t* lab_c = nullptr;
  bool symmetric = false;

  int64_t id_r(int64_t p) const { return ids_r ? ids_r[p] : p; }
  int64_t id_c(int64_t q) const { return ids_c ? ids_c[q] : q; }

  int weight(Mask m, int64_t p, int64_t q) const {
    return pm::pair_weight(m, symmetric, p, q, id_r(p), id_c(q), lab_r ? lab_r[p] : 0,
                           lab_c ? lab_c[q] : 0);
  }
};

constexpr int64_t kPairTile = 256;  // rows = columns per tile

// The tiles an op computes, skipping those the block ranges rule out.
inline std::vector<Tile> pair_tiles(Mask m, const PairIndex& ix, int64_t n_r, int64_t n_c) {
  const auto rr = block_ranges(n_r, kPairTile, ix.ids_r, ix.lab_r);
  const auto cr = ix.symmetric ? rr : block_ranges(n_c, kPairTile, ix.ids_c, ix.lab_c);
  return plan_tiles(m, ix.symmetric, kPairTile, n_r, n_c, rr, cr);
}

// Fills w (rows x cols, row-major, leading dimension cols) with the tile's
// pair weights; returns whether any is nonzero. The mask is a template
// argument and the row's id and label are read once per row, so the inner
// loop is a few compares per pair (it runs for every pair of every pass).
template <Mask M, typename T>
bool tile_weights_for(const PairIndex& ix, const Tile& t, T* w) {
  bool any = false;
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t p = t.r0 + r, id_p = ix.id_r(p), lab_p = ix.lab_r ? ix.lab_r[p] : 0;
    T* w_row = w + r * t.cols;
    int row_any = 0;
    for (int64_t c = 0; c < t.cols; ++c) {
      const int64_t q = t.c0 + c;
      const int wt = pm::pair_weight(M, ix.symmetric, p, q, id_p, ix.id_c(q), lab_p,
                                     ix.lab_c ? ix.lab_c[q] : 0);
      w_row[c] = T(wt);
      row_any |= wt;
    }
    any |= row_any != 0;
  }
  return any;
}

template <typename T>
bool tile_weights(Mask m, const PairIndex& ix, const Tile& t, T* w) {
  switch (m) {
    case Mask::All: return tile_weights_for<Mask::All>(ix, t, w);
    case Mask::OffDiagonal: return tile_weights_for<Mask::OffDiagonal>(ix, t, w);
    case Mask::UpperSameLabel: return tile_weights_for<Mask::UpperSameLabel>(ix, t, w);
    case Mask::UpperDiffLabel: return tile_weights_for<Mask::UpperDiffLabel>(ix, t, w);
  }
  return false;
}

// Scratch matrices of one tile, each rows x cols and contiguous: [0] the pair
// weights, [1] the dot products x_r x_c^T, [2..] free for the caller.
struct TileScratch {
  at::Tensor buf;
  const Tile* tile = nullptr;
  at::Tensor operator[](int64_t k) const {
    return buf[k].narrow(0, 0, tile->rows * tile->cols).view({tile->rows, tile->cols});
  }
};

// Per-worker scratch of n_scratch tiles, allocated by the worker on first use.
struct WorkerScratch {
  std::vector<TileScratch> slots;
  int64_t n_scratch;
  at::TensorOptions options;

  WorkerScratch(int64_t n_slots, int64_t n, at::TensorOptions opts)
      : slots(n_slots), n_scratch(n), options(opts) {}

  TileScratch& get(int64_t slot, const Tile& t) {
    TileScratch& s = slots[slot];
    if (!s.buf.defined()) s.buf = at::empty({n_scratch, kPairTile * kPairTile}, options);
    s.tile = &t;
    return s;
  }
};

// Fills scratch[0] (weights) and scratch[1] (dots) for tile t; false when the
// tile holds no pair of the mask (nothing computed).
template <typename T>
bool prepare_tile(Mask m, const PairIndex& ix, const Tile& t, const at::Tensor& x_r,
                  const at::Tensor& x_c, const TileScratch& scratch) {
  if (!tile_weights(m, ix, t, scratch[0].template data_ptr<T>())) return false;
  at::Tensor dots = scratch[1];
  tile_dot(dots, x_r.narrow(0, t.r0, t.rows), x_c.narrow(0, t.c0, t.cols));
  return true;
}

// Runs fn(slot, tile_index, scratch) for every tile holding at least one pair
// of the mask, tiles handed out dynamically. For ops whose per-worker results
// are integers or exact selections, so that the assignment cannot matter.
template <typename T, typename F>
void visit_pair_tiles(Mask m, const PairIndex& ix, const std::vector<Tile>& tiles,
                      int64_t slots, const at::Tensor& x_r, const at::Tensor& x_c,
                      int64_t n_scratch, F&& fn) {
  WorkerScratch scratch(slots, n_scratch, x_r.options());
  parallel_items(tiles.size(), slots, [&](int64_t slot, int64_t ti) {
    const TileScratch& sc = scratch.get(slot, tiles[ti]);
    if (prepare_tile<T>(m, ix, tiles[ti], x_r, x_c, sc)) fn(slot, ti, sc);
  });
}

}  // namespace relkd
