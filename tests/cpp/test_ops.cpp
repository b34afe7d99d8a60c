// C++ test of the operators through the dispatcher, as libtorch users (and
// sanitizer builds) call them: each result is checked against plain ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <set>
#include <vector>

#include "../../csrc/tile_plan.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

std::vector<c10::IValue> call(const char* name, std::vector<c10::IValue> args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&args);
  return args;
}

void test_topk_sim() {
  at::manual_seed(0);
  auto q = at::randn({70, 16}, at::kDouble), c = at::randn({3000, 16}, at::kDouble);
  auto out = call("relkd::topk_sim", {q, c, int64_t(9), c10::IValue(), c10::IValue(),
                                      c10::IValue(), false, int64_t(0)});
  auto ref = at::topk(at::mm(q, c.t()), 9, 1);
  expect(at::allclose(out[0].toTensor(), std::get<0>(ref)), "topk_sim values match mm + topk");
  expect(at::equal(out[1].toTensor(), std::get<1>(ref)), "topk_sim indices match mm + topk");
}

void test_pair_dot() {
  auto a = at::randn({20, 8}, at::kDouble), b = at::randn({30, 8}, at::kDouble);
  auto idx = at::randint(-1, 30, {20, 4}, at::kLong);
  auto out = call("relkd::pair_dot", {a, b, idx})[0].toTensor();
  auto gathered = (a.unsqueeze(1) * b.index_select(0, idx.clamp_min(0).flatten()).view({20, 4, 8})).sum(2);
  auto ref = at::where(idx >= 0, gathered, at::zeros_like(gathered));
  expect(at::allclose(out, ref), "pair_dot matches the gathered product");
}

void test_pairwise_cckd() {
  auto x = at::randn({300, 12}, at::kDouble), z = at::randn({300, 10}, at::kDouble);
  x = x / x.norm(2, 1, true);
  z = z / z.norm(2, 1, true);
  auto coef = at::tensor({0.5, 0.3, 0.2}, at::kDouble);
  auto out = call("relkd::pairwise_loss",
                  {std::string("cckd"), x, z, c10::IValue(), c10::IValue(), c10::IValue(),
                   c10::IValue(), c10::IValue(), c10::IValue(), coef, false, false});
  auto phi = [&](const at::Tensor& u) { return 0.5 + 0.3 * u + 0.2 * u * u; };
  auto diff = phi(at::mm(x, x.t())) - phi(at::mm(z, z.t()));
  auto ref = (diff * diff).sum();
  expect(at::allclose(out[0].toTensor(), ref), "pairwise_loss(cckd) matches the N x N sum");
}

// The tile waves (csrc/tile_plan.h) that let threads add into one gradient
// without races: every planned tile is in exactly one wave, and no two tiles
// of a wave touch the same row or column block (symmetric: the same block).
void test_tile_waves() {
  bool ok = true;
  for (bool symmetric : {true, false})
    for (int64_t rows = 1; rows <= 23; ++rows)
      for (int64_t cols = symmetric ? rows : 1; cols <= (symmetric ? rows : 23); ++cols) {
        std::vector<relkd::Tile> tiles;
        for (int64_t rb = 0; rb < rows; ++rb)
          for (int64_t cb = symmetric ? rb : 0; cb < cols; ++cb)
            tiles.push_back({rb, 1, cb, 1, rb, cb});
        const auto waves = relkd::group_by_wave(tiles, symmetric, rows, cols);
        std::set<int64_t> seen;
        for (const auto& wave : waves) {
          std::set<int64_t> row_blocks, col_blocks;
          for (int64_t i : wave) {
            const relkd::Tile& t = tiles[i];
            ok &= seen.insert(i).second;
            if (symmetric) {
              ok &= row_blocks.insert(t.rb).second;
              ok &= t.rb == t.cb || row_blocks.insert(t.cb).second;
            } else {
              ok &= row_blocks.insert(t.rb).second && col_blocks.insert(t.cb).second;
            }
          }
        }
        ok &= seen.size() == tiles.size();
        ok &= (int64_t)waves.size() <= (symmetric ? rows : std::max(rows, cols));
      }
  expect(ok, "tile waves: each tile once, no block twice in a wave");
}

// order_by_block: the tiles in wave order, and for each block the turns of
// its tiles numbered 0, 1, 2, ... in that order, so a worker that waits for
// its turn applies a block's tiles in wave order.
void test_block_order() {
  bool ok = true;
  for (bool symmetric : {true, false})
    for (int64_t rows = 1; rows <= 9; ++rows) {
      const int64_t cols = symmetric ? rows : rows + 2;
      std::vector<relkd::Tile> tiles;
      for (int64_t rb = 0; rb < rows; ++rb)
        for (int64_t cb = symmetric ? rb : 0; cb < cols; ++cb)
          tiles.push_back({rb, 1, cb, 1, rb, cb});
      const auto waves = relkd::group_by_wave(tiles, symmetric, rows, cols);
      const auto order = relkd::order_by_block(tiles, waves, symmetric, rows, cols);
      std::vector<int64_t> flat, next(rows + cols, 0);
      for (const auto& wave : waves) flat.insert(flat.end(), wave.begin(), wave.end());
      ok &= order.size() == flat.size();
      for (size_t i = 0; i < order.size() && ok; ++i) {
        const relkd::OrderedTile& o = order[i];
        const relkd::Tile& t = tiles[o.tile];
        ok &= o.tile == flat[i];
        ok &= o.block[0] == t.rb;
        ok &= o.block[1] == (symmetric ? (t.rb == t.cb ? -1 : t.cb) : rows + t.cb);
        for (int j = 0; j < 2; ++j)
          if (o.block[j] >= 0) ok &= o.turn[j] == next[o.block[j]]++;
      }
    }
  expect(ok, "block order: wave order, turns count each block's tiles");
}

// The top-k's column ranges (csrc/tile_plan.h): within 1 .. most, a last
// wave within a fraction kWaveSlack of the fullest any allowed count gives,
// and the fewest ranges that do.
void test_fullest_wave_splits() {
  using relkd::last_wave_fill;
  bool ok = relkd::fullest_wave_splits(128, 264, 3) == 2 &&  // 97 % against 73 % with 3
            relkd::fullest_wave_splits(128, 264, 64) == 2 &&
            relkd::fullest_wave_splits(1, 8, 64) == 8 &&
            relkd::fullest_wave_splits(1, 264, 4) == 4;  // a few queries: every range
  for (int64_t row_blocks = 1; row_blocks <= 40; ++row_blocks)
    for (int64_t resident : {1, 2, 8, 132, 264})
      for (int64_t most = 1; most <= 70; most += 3) {
        const int64_t s = relkd::fullest_wave_splits(row_blocks, resident, most);
        ok = ok && s >= 1 && s <= most;
        double best = 0.0;
        for (int64_t other = 1; other <= most; ++other)
          best = std::max(best, last_wave_fill(row_blocks * other, resident));
        const double slack = best * (1.0 - relkd::kWaveSlack);
        ok = ok && last_wave_fill(row_blocks * s, resident) >= slack;
        for (int64_t fewer = 1; fewer < s; ++fewer)
          ok = ok && last_wave_fill(row_blocks * fewer, resident) < slack;
      }
  expect(ok, "top-k splits: a last wave near the fullest, fewest ranges, within 1 .. most");
}

}  // namespace

int main() {
  test_tile_waves();
  test_block_order();
  test_fullest_wave_splits();
  test_topk_sim();
  test_pair_dot();
  test_pairwise_cckd();
  return failures == 0 ? 0 : 1;
}
