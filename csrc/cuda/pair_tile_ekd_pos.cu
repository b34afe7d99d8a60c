// pairwise_loss tiles of kind ekd_pos (SPEC §3.6).
#include "pair_rows_mma.cuh"

namespace relkd {
namespace cuda {

int pair_tile_ekd_pos(const PairTileArgs<float>& a, const TileView& v, const TileMask& m,
                      Stream s) {
  return launch_pair_tile(EkdPosTerms<float>{a.params, (a.n_params - 1) / 2}, a, v, m, s);
}
int pair_tile_ekd_pos(const PairTileArgs<double>& a, const TileView& v, const TileMask& m,
                      Stream s) {
  return launch_pair_tile(EkdPosTerms<double>{a.params, (a.n_params - 1) / 2}, a, v, m, s);
}
int pair_tile_mma_ekd_pos(const PairTileArgs<float>& a, const MmaTileInputs& in,
                          const TileView& v, const TileMask& m, Stream s) {
  return launch_pair_tile_mma(EkdPosTerms<float>{a.params, (a.n_params - 1) / 2}, a, in, v, m,
                              s);
}
int pair_rows_mma_ekd_pos(const RowsMmaArgs& a, const TileMask& m, Stream s) {
  return launch_pair_rows_mma(EkdPosTerms<float>{a.params, (a.n_params - 1) / 2}, a, m, s);
}

}  // namespace cuda
}  // namespace relkd
