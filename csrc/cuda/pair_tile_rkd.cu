// pairwise_loss tiles of kinds rkd_dist_sum and rkd_distance (SPEC §6).
#include "pair_rows_mma.cuh"

namespace relkd {
namespace cuda {
namespace {

template <typename T>
int rkd(const PairTileArgs<T>& a, const TileView& v, const TileMask& m, Stream s) {
  if (a.kind == PairKind::RkdDistSum) return launch_pair_tile(RkdDistSumTerms<T>{}, a, v, m, s);
  return launch_pair_tile(RkdDistanceTerms<T>{a.params}, a, v, m, s);
}

int rkd_rows(const RowsMmaArgs& a, const TileMask& m, Stream s) {
  if (a.kind == PairKind::RkdDistSum)
    return launch_pair_rows_mma(RkdDistSumTerms<float>{}, a, m, s);
  return launch_pair_rows_mma(RkdDistanceTerms<float>{a.params}, a, m, s);
}

int rkd_mma(const PairTileArgs<float>& a, const MmaTileInputs& in, const TileView& v,
            const TileMask& m, Stream s) {
  if (a.kind == PairKind::RkdDistSum)
    return launch_pair_tile_mma(RkdDistSumTerms<float>{}, a, in, v, m, s);
  return launch_pair_tile_mma(RkdDistanceTerms<float>{a.params}, a, in, v, m, s);
}

}  // namespace

int pair_tile_rkd(const PairTileArgs<float>& a, const TileView& v, const TileMask& m, Stream s) {
  return rkd(a, v, m, s);
}
int pair_tile_rkd(const PairTileArgs<double>& a, const TileView& v, const TileMask& m,
                  Stream s) {
  return rkd(a, v, m, s);
}
int pair_tile_mma_rkd(const PairTileArgs<float>& a, const MmaTileInputs& in, const TileView& v,
                      const TileMask& m, Stream s) {
  return rkd_mma(a, in, v, m, s);
}
int pair_rows_mma_rkd(const RowsMmaArgs& a, const TileMask& m, Stream s) {
  return rkd_rows(a, m, s);
}

}  // namespace cuda
}  // namespace relkd
