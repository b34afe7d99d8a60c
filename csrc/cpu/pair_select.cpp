// pair_select on CPU: exact order statistics and top-k over all negative
// pairs (id_i < id_j, labels differ) of x x^T, without materialising them.
//
// pair_histogram is one pass of a radix select on the order keys of the
// values (common.h): per prefix of already-resolved high bits, a histogram of
// the next 16 bits. relkd/ops.py drives the passes (2 for float32, 4 for
// float64) and, under DDP, all-reduces each pass's histograms between them.
// pair_topk then collects the pairs above the selected threshold key;
// pair_histogram_topk instead finds the best pairs during the first
// histogram pass with a running bar, which saves that extra pass over all
// pairs (and their similarity products); it can also return the whole keys
// falling in chosen first-pass bins, from which ops.py resolves a target
// whose bin they cover without the later passes.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "chunk_test.h"
#include "pairs.h"

namespace relkd {
namespace {

constexpr int64_t kDigits = 1 << 16;

// The checked arguments with host pointers for the pair masks.
struct SelectInputs {
  at::Tensor x_r, x_c;
  PairIndex ix;
  SelectArgs args;  // owns the contiguous index vectors ix points into
};

SelectInputs select_inputs(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                           const at::Tensor& labels_r, const c10::optional<at::Tensor>& labels_c,
                           const c10::optional<at::Tensor>& ids_r,
                           const c10::optional<at::Tensor>& ids_c) {
  SelectInputs in;
  in.args = check_select_args(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  in.x_r = in.args.x_r;
  in.x_c = in.args.x_c;
  in.ix = PairIndex{data_or_null(in.args.ids_r), data_or_null(in.args.ids_c),
                    data_or_null(in.args.lab_r), data_or_null(in.args.lab_c), in.args.symmetric};
  return in;
}

constexpr Mask kNegative = Mask::UpperDiffLabel;

// ------------------------------------------------------------ pair lists
template <typename T>
struct PairEntry {
  T value;
  int64_t i, j;  // ids, i < j
};

// Best first: larger value, then smaller (i, j).
template <typename T>
bool entry_before(const PairEntry<T>& a, const PairEntry<T>& b) {
  const bool a_worse = ranks_below(a.value, 0, b.value, 0);  // equal index: values decide
  const bool b_worse = ranks_below(b.value, 0, a.value, 0);
  if (a_worse != b_worse) return b_worse;
  return a.i != b.i ? a.i < b.i : a.j < b.j;
}

// Keeps the `cap` best entries of a growing list, trimming when it doubles,
// so memory stays O(cap) however many pairs tie with the threshold.
template <typename T>
void trim(std::vector<PairEntry<T>>& v, int64_t cap) {
  if ((int64_t)v.size() <= cap) return;
  std::nth_element(v.begin(), v.begin() + cap, v.end(), entry_before<T>);
  v.resize(cap);
}

// The best `cap` pairs seen so far, trimmed to cap when they reach 2 cap;
// after a trim, the worst kept pair is the bar a newcomer must beat.
template <typename T>
struct TopPairs {
  std::vector<PairEntry<T>> list;
  int64_t cap = 0;
  bool has_bar = false;
  PairEntry<T> bar{};

  // A cheap first test on the value alone (most pairs fail it).
  bool may_enter(T v) const { return !has_bar || !(v < bar.value); }

  void offer(const PairEntry<T>& e) {
    if (has_bar && !entry_before(e, bar)) return;
    list.push_back(e);
    if ((int64_t)list.size() < 2 * cap) return;
    trim(list, cap);
    bar = *std::max_element(list.begin(), list.end(), entry_before<T>);
    has_bar = true;
  }
};

// (values, id_i, id_j) of length topk from the best pairs in order, padded
// with (-inf, -1, -1).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_tensors(const std::vector<PairEntry<T>>& best,
                                                           int64_t topk,
                                                           const at::TensorOptions& opts) {
  at::Tensor values = at::full({topk}, -std::numeric_limits<T>::infinity(), opts);
  at::Tensor rows = at::full({topk}, -1, opts.dtype(at::kLong));
  at::Tensor cols = at::full({topk}, -1, opts.dtype(at::kLong));
  T* pv = values.data_ptr<T>();
  int64_t* pr = rows.data_ptr<int64_t>();
  int64_t* pc = cols.data_ptr<int64_t>();
  const int64_t kept = std::min<int64_t>(topk, best.size());
  for (int64_t e = 0; e < kept; ++e) {
    pv[e] = best[e].value;
    pr[e] = best[e].i;
    pc[e] = best[e].j;
  }
  return {values, rows, cols};
}

// ------------------------------------------------------------- histogram
using Selected = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The value whose order key (csrc/pair_math.h) is `key`; keys of NaN bit
// patterns above +inf's key and below -inf's give +inf and -inf.
template <typename T>
T key_to_value(typename KeyOf<T>::type key) {
  using K = typename KeyOf<T>::type;
  const K sign = K(1) << (sizeof(K) * 8 - 1);
  const T inf = std::numeric_limits<T>::infinity();
  if (key >= order_key(inf)) return inf;
  if (key <= order_key(-inf)) return -inf;
  const K bits = (key & sign) ? K(key & ~sign) : K(~key);
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// Start of the first chunk of kRangeChunk values in [begin, n) holding one
// in [lo, hi], or of the tail shorter than a chunk (packed compares).
constexpr int64_t kRangeChunk = chunk::kChunk;

template <typename T>
int64_t find_chunk_in_range(const T* v, int64_t begin, int64_t n, T lo, T hi) {
  int64_t e = begin;
  for (; e + kRangeChunk <= n; e += kRangeChunk)
    if (chunk::any_in_range(v + e, lo, hi)) return e;
  return e;
}

// Which first-pass bins (the top 16 key bits) to collect whole keys from,
// and the most keys to keep: past the cap the collection is given up (its
// memory stays bounded however many pairs tie in those bins).
struct Collect {
  std::vector<uint8_t> in_bin;  // empty: collect nothing
  int64_t cap = 0;
};

// The workers' collected keys, sorted descending, as int64 bit patterns.
template <typename K>
at::Tensor merge_collected(const std::vector<std::vector<K>>& lists,
                           const at::TensorOptions& opts) {
  std::vector<K> all;
  for (const auto& l : lists) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end(), std::greater<K>());
  at::Tensor out = at::empty({(int64_t)all.size()}, opts);
  int64_t* o = out.data_ptr<int64_t>();
  // uint64 keys wrap to their bit pattern; uint32 keys stay non-negative.
  for (size_t e = 0; e < all.size(); ++e) o[e] = static_cast<int64_t>(all[e]);
  return out;
}

// The histogram of pair_histogram and, when topk > 0, the best topk pairs
// met in the same sweep (pair_histogram_topk); with topk == 0 the last three
// outputs are empty. Keys in the collected bins are returned whole.
template <typename T>
Selected histogram_impl(const SelectInputs& in, const at::Tensor& prefixes, int64_t shift,
                        int64_t topk, const c10::optional<at::Tensor>& collect_ranges,
                        int64_t collect_cap, int64_t top_min_key) {
  using K = typename KeyOf<T>::type;
  constexpr int64_t bits = sizeof(K) * 8;
  check_histogram_args(bits, prefixes, shift, in.x_r);
  const Collect collect{collect_bin_flags(collect_ranges, collect_cap, shift, bits, top_min_key),
                        collect_cap};
  const K top_min = static_cast<K>(static_cast<uint64_t>(top_min_key));
  const bool check_prefix = shift + 16 < bits;
  const int64_t n_prefix = prefixes.numel();
  const int64_t* pre = prefixes.data_ptr<int64_t>();
  // Most keys lie outside [lowest, highest] prefix: one test rejects them.
  const int64_t pre_lo = n_prefix ? *std::min_element(pre, pre + n_prefix) : 0;
  const int64_t pre_hi = n_prefix ? *std::max_element(pre, pre + n_prefix) : -1;

  // A later pass counts only keys under the given prefixes: their values
  // lie in [v_lo, v_hi], so chunks of values outside it are skipped without
  // computing keys. Not when NaN's key (0) is under a prefix (NaN compares
  // false), nor while collecting the top pairs.
  const bool skip_by_value = check_prefix && topk == 0 && pre_lo > 0 && pre_lo <= pre_hi;
  T v_lo = 0, v_hi = 0;
  if (skip_by_value) {
    const int64_t low_bits = shift + 16;
    v_lo = key_to_value<T>(K(pre_lo) << low_bits);
    v_hi = key_to_value<T>((K(pre_hi) << low_bits) | ((K(1) << low_bits) - 1));
  }

  const auto tiles = pair_tiles(kNegative, in.ix, in.x_r.size(0), in.x_c.size(0));
  const int64_t slots = worker_slots(tiles.size());
  // Per-worker counts (integers: the sum cannot depend on which worker ran a
  // tile), best pairs (an exact selection: neither can the merged best) and
  // collected keys (sorted when merged).
  std::vector<std::vector<int64_t>> hist(slots);
  std::vector<TopPairs<T>> best(slots);
  for (auto& b : best) b.cap = topk;
  std::vector<std::vector<K>> kept(slots);
  const uint8_t* in_bin = collect.in_bin.empty() ? nullptr : collect.in_bin.data();
  // Keys met in the bins, by all workers: past the cap nobody stores more
  // (memory stays O(cap) for any thread count) and the merge returns none.
  std::atomic<int64_t> in_bins{0};

  visit_pair_tiles<T>(kNegative, in.ix, tiles, slots, in.x_r, in.x_c, 2,
                      [&](int64_t slot, int64_t ti, const TileScratch& sc) {
    const Tile& t = tiles[ti];
    const at::Tensor w_t = sc[0], s_t = sc[1];
    const T* w = w_t.data_ptr<T>();
    const T* s = s_t.data_ptr<T>();
    if (hist[slot].empty()) hist[slot].assign(n_prefix * kDigits, 0);
    int64_t* h = hist[slot].data();
    TopPairs<T>& top = best[slot];
    std::vector<K>& keys = kept[slot];
    const int64_t n_pairs = s_t.numel();
    for (int64_t e = 0; e < n_pairs; ++e) {
      if (skip_by_value && e % kRangeChunk == 0) {
        // Whole chunks whose values all lie outside the prefixes' range.
        e = find_chunk_in_range(s, e, n_pairs, v_lo, v_hi);
        if (e == n_pairs) break;
      }
      if (w[e] == T(0)) continue;
      const K key = order_key(s[e]);
      const int64_t digit = int64_t((key >> shift) & K(kDigits - 1));
      if (topk > 0 && top.may_enter(s[e]) && key >= top_min) {
        const int64_t a = in.ix.id_r(t.r0 + e / t.cols), b = in.ix.id_c(t.c0 + e % t.cols);
        top.offer({s[e], std::min(a, b), std::max(a, b)});
      }
      if (!check_prefix) {
        ++h[digit];
        if (in_bin && in_bin[digit] &&
            in_bins.fetch_add(1, std::memory_order_relaxed) < collect.cap)
          keys.push_back(key);
        continue;
      }
      const int64_t high = int64_t(key >> (shift + 16));
      if (high < pre_lo || high > pre_hi) continue;
      for (int64_t p = 0; p < n_prefix; ++p)
        if (pre[p] == high) ++h[p * kDigits + digit];
    }
  });

  auto out = zeros_here({n_prefix, kDigits}, prefixes.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (const auto& h : hist)
    for (int64_t e = 0; e < (int64_t)h.size(); ++e) o[e] += h[e];
  std::vector<PairEntry<T>> merged;
  for (const auto& b : best) merged.insert(merged.end(), b.list.begin(), b.list.end());
  trim(merged, topk);
  std::sort(merged.begin(), merged.end(), entry_before<T>);
  auto [values, rows, cols] = top_tensors(merged, topk, in.x_r.options());
  if (in_bins.load() > collect.cap) kept.clear();
  return {out, values, rows, cols, merge_collected(kept, prefixes.options())};
}

Selected pair_histogram_topk_cpu(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                                 const at::Tensor& labels_r,
                                 const c10::optional<at::Tensor>& labels_c,
                                 const c10::optional<at::Tensor>& ids_r,
                                 const c10::optional<at::Tensor>& ids_c,
                                 const at::Tensor& prefixes, int64_t shift, int64_t topk,
                                 const c10::optional<at::Tensor>& collect_ranges,
                                 int64_t collect_cap, int64_t top_min_key) {
  BelowAutograd below_autograd;
  const auto in = select_inputs(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  TORCH_CHECK_VALUE(topk >= 0, "topk must be >= 0, got ", topk);
  const auto pre = prefixes.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(x_r.scalar_type(), "pair_histogram_topk", [&] {
    return histogram_impl<scalar_t>(in, pre, shift, topk, collect_ranges, collect_cap,
                                    top_min_key);
  });
}

at::Tensor pair_histogram_cpu(const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c,
                              const at::Tensor& labels_r,
                              const c10::optional<at::Tensor>& labels_c,
                              const c10::optional<at::Tensor>& ids_r,
                              const c10::optional<at::Tensor>& ids_c, const at::Tensor& prefixes,
                              int64_t shift) {
  return std::get<0>(pair_histogram_topk_cpu(x_r, x_c, labels_r, labels_c, ids_r, ids_c,
                                             prefixes, shift, 0, c10::nullopt, 0, 0));
}

// ------------------------------------------------------------------ top-k
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_impl(const SelectInputs& in,
                                                         int64_t threshold_key, int64_t n_equal,
                                                         int64_t topk) {
  using K = typename KeyOf<T>::type;
  const K tau = static_cast<K>(threshold_key);
  const auto tiles = pair_tiles(kNegative, in.ix, in.x_r.size(0), in.x_c.size(0));
  const int64_t slots = worker_slots(tiles.size());
  const int64_t eq_cap = std::min(n_equal, topk);
  // Per-worker candidates, each trimmed to its best: the merged best set is
  // the same whichever worker saw which tile.
  std::vector<std::vector<PairEntry<T>>> above(slots), equal(slots);

  visit_pair_tiles<T>(kNegative, in.ix, tiles, slots, in.x_r, in.x_c, 2,
                      [&](int64_t slot, int64_t ti, const TileScratch& sc) {
    const Tile& t = tiles[ti];
    const at::Tensor w_t = sc[0], s_t = sc[1];
    const T* w = w_t.data_ptr<T>();
    const T* s = s_t.data_ptr<T>();
    for (int64_t r = 0; r < t.rows; ++r)
      for (int64_t c = 0; c < t.cols; ++c) {
        const int64_t e = r * t.cols + c;
        if (w[e] == T(0)) continue;
        const K key = order_key(s[e]);
        if (key < tau) continue;
        const int64_t a = in.ix.id_r(t.r0 + r), b = in.ix.id_c(t.c0 + c);
        const PairEntry<T> entry{s[e], std::min(a, b), std::max(a, b)};
        auto& list = key > tau ? above[slot] : equal[slot];
        list.push_back(entry);
        if ((int64_t)list.size() >= 2 * std::max<int64_t>(topk, 1))
          trim(list, key > tau ? topk : eq_cap);
      }
  });

  std::vector<PairEntry<T>> best, ties;
  for (int64_t l = 0; l < slots; ++l) {
    best.insert(best.end(), above[l].begin(), above[l].end());
    ties.insert(ties.end(), equal[l].begin(), equal[l].end());
  }
  trim(best, topk);
  trim(ties, eq_cap);
  std::sort(best.begin(), best.end(), entry_before<T>);
  std::sort(ties.begin(), ties.end(), entry_before<T>);
  best.insert(best.end(), ties.begin(), ties.end());

  return top_tensors(best, topk, in.x_r.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_topk_cpu(
    const at::Tensor& x_r, const c10::optional<at::Tensor>& x_c, const at::Tensor& labels_r,
    const c10::optional<at::Tensor>& labels_c, const c10::optional<at::Tensor>& ids_r,
    const c10::optional<at::Tensor>& ids_c, int64_t threshold_key, int64_t n_equal, int64_t topk) {
  BelowAutograd below_autograd;
  const auto in = select_inputs(x_r, x_c, labels_r, labels_c, ids_r, ids_c);
  check_pair_topk_args(x_r, threshold_key, n_equal, topk);
  return AT_DISPATCH_FLOATING_TYPES(x_r.scalar_type(), "pair_topk", [&] {
    return topk_impl<scalar_t>(in, threshold_key, n_equal, topk);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(relkd, CPU, m) {
  m.impl("pair_histogram", &pair_histogram_cpu);
  m.impl("pair_topk", &pair_topk_cpu);
  m.impl("pair_histogram_topk", &pair_histogram_topk_cpu);
}

}  // namespace relkd
