// pairwise_loss tiles of kind cckd (SPEC §4).
#include "pair_rows_mma.cuh"

namespace relkd {
namespace cuda {

int pair_tile_cckd(const PairTileArgs<float>& a, const TileView& v, const TileMask& m, Stream s) {
  return launch_pair_tile(CckdTerms<float>{a.params, a.n_params}, a, v, m, s);
}
int pair_tile_cckd(const PairTileArgs<double>& a, const TileView& v, const TileMask& m,
                   Stream s) {
  return launch_pair_tile(CckdTerms<double>{a.params, a.n_params}, a, v, m, s);
}
int pair_tile_mma_cckd(const PairTileArgs<float>& a, const MmaTileInputs& in, const TileView& v,
                       const TileMask& m, Stream s) {
  return launch_pair_tile_mma(CckdTerms<float>{a.params, a.n_params}, a, in, v, m, s);
}
int pair_rows_mma_cckd(const RowsMmaArgs& a, const TileMask& m, Stream s) {
  return launch_pair_rows_mma(CckdTerms<float>{a.params, a.n_params}, a, m, s);
}

}  // namespace cuda
}  // namespace relkd
