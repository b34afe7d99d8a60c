// pair_select's per-pair steps (SPEC §3: EKD's exact order statistics over
// the negative pairs), shared by the kernels that read similarity tiles
// (pair_select.cu) and those that compute them on tensor cores
// (pair_select_mma.cu), so both classify a pair alike.
#pragma once

#include <climits>

#include "pair_tile.cuh"

namespace relkd {
namespace cuda {

constexpr int kDigitBits = 16;
constexpr int64_t kDigits = int64_t(1) << kDigitBits;

// Histogram bin of one pair's value (prefix row * 65536 + digit), or -1
// when its high key bits match no prefix.
template <typename T>
__device__ inline int64_t histogram_bin(T value, const int64_t* prefixes, int64_t n_prefix,
                                        int shift) {
  using K = typename pm::KeyOf<T>::type;
  const K key = pm::order_key(value);
  const int64_t digit = static_cast<int64_t>((key >> shift) & K(kDigits - 1));
  if (shift + kDigitBits >= static_cast<int>(8 * sizeof(K))) return digit;
  const int64_t high = static_cast<int64_t>(key >> (shift + kDigitBits));
  for (int64_t p = 0; p < n_prefix; ++p)
    if (prefixes[p] == high) return p * kDigits + digit;
  return -1;
}

// The first pass's bins (the order key's top 16 bits, no prefix) where
// cosine similarities pile up: |value| in [2^-16, 2), 17 binades of
// 2^kFraction bins on either side of zero (the key puts a negative value's
// bins below 0x8000, a positive one's above). A block counts its pairs in
// those bins in shared memory and adds each count to the global histogram
// once (flush_hot_bins), instead of one global atomic per warp and bin:
// thousands of pairs per block share a few hundred such bins, which every
// block would otherwise hit. The other bins go to global memory directly.
template <typename T>
struct HotBins {
  static constexpr bool kFloat = sizeof(T) == 4;
  static constexpr int kFraction = kFloat ? 7 : 4;  // fraction bits among the 16
  static constexpr int64_t kBias = kFloat ? 127 : 1023;
  static constexpr int kPerSign = 17 << kFraction;
  static constexpr int kSlots = 2 * kPerSign;
  static constexpr int64_t kPositive = 0x8000 + ((kBias - 16) << kFraction);
  static constexpr int64_t kNegative = 0x8000 - ((kBias + 1) << kFraction);

  __host__ __device__ static int slot(int64_t bin) {
    if (bin >= kPositive && bin < kPositive + kPerSign) return static_cast<int>(bin - kPositive);
    if (bin >= kNegative && bin < kNegative + kPerSign)
      return kPerSign + static_cast<int>(bin - kNegative);
    return -1;
  }
  __host__ __device__ static int64_t bin(int slot) {
    return slot < kPerSign ? kPositive + slot : kNegative + (slot - kPerSign);
  }
};

// Whether a histogram pass at `shift` is the first (its bins the top 16 key
// bits): the one hot bins serve.
template <typename T>
__host__ __device__ inline bool first_pass(int shift) {
  return shift + kDigitBits >= static_cast<int>(8 * sizeof(typename pm::KeyOf<T>::type));
}

// hot (HotBins<T>::kSlots counts in shared memory, or nullptr) zeroed; all
// threads of the block call it.
template <typename T>
__device__ inline void clear_hot_bins(unsigned* hot) {
  if (!hot) return;
  for (int s = threadIdx.x; s < HotBins<T>::kSlots; s += kThreads) hot[s] = 0;
  __syncthreads();
}

// The block's hot counts into the global histogram, one atomic per nonzero
// bin; all threads of the block call it.
template <typename T>
__device__ inline void flush_hot_bins(const unsigned* hot, unsigned long long* hist) {
  if (!hot) return;
  __syncthreads();
  for (int s = threadIdx.x; s < HotBins<T>::kSlots; s += kThreads)
    if (hot[s] != 0) atomicAdd(&hist[HotBins<T>::bin(s)], static_cast<unsigned long long>(hot[s]));
}

// One count into the histogram for every lane whose bin is >= 0: a hot bin's
// into `hot` (when given), any other into hist[bin]. All 32 lanes of the warp
// call it together; similar values share bins: one atomic per distinct bin
// in the warp.
template <typename T>
__device__ inline void add_to_histogram(int64_t bin, unsigned* hot, unsigned long long* hist) {
  const unsigned same = __match_any_sync(0xffffffffu, bin);
  if (bin < 0 || static_cast<int>(threadIdx.x % 32) != __ffs(same) - 1) return;
  const int slot = hot ? HotBins<T>::slot(bin) : -1;
  if (slot >= 0)
    atomicAdd(&hot[slot], static_cast<unsigned>(__popc(same)));
  else
    atomicAdd(&hist[bin], static_cast<unsigned long long>(__popc(same)));
}

// The (i, j) ids of the mask's pair (p, q), i < j.
__device__ inline void pair_ids(const TileMask& mask, int64_t p, int64_t q, int64_t* i,
                                int64_t* j) {
  const int64_t id_p = mask.ids_r ? mask.ids_r[p] : p;
  const int64_t id_q = mask.ids_c ? mask.ids_c[q] : q;
  *i = id_p < id_q ? id_p : id_q;
  *j = id_p < id_q ? id_q : id_p;
}

// This lane's slot in a buffer filled to *count, if `want`: the warp's
// wanting lanes take consecutive slots by one atomic (appends from a whole
// sweep meet at one counter). All 32 lanes of the warp call it together.
__device__ inline unsigned long long warp_append(bool want, unsigned long long* count) {
  const unsigned wanting = __ballot_sync(0xffffffffu, want);
  if (wanting == 0) return 0;
  const int lane = static_cast<int>(threadIdx.x % 32), leader = __ffs(wanting) - 1;
  unsigned long long base = 0;
  if (lane == leader) base = atomicAdd(count, static_cast<unsigned long long>(__popc(wanting)));
  base = __shfl_sync(0xffffffffu, base, leader);
  return base + static_cast<unsigned long long>(__popc(wanting & ((1u << lane) - 1u)));
}

template <typename T>
__device__ inline bool collects(const FirstPassCollect<T>& out) {
  return out.in_bin != nullptr || out.top_v != nullptr;
}

// The first pass's collections (launchers.h, FirstPassCollect) of the mask's
// pair (p, q) with `value`, if counted (a pair of the mask in the view).
// All 32 lanes of the warp call it together.
template <typename T>
__device__ inline void collect_first_pass(const TileMask& mask, int64_t p, int64_t q, T value,
                                          bool counted, const FirstPassCollect<T>& out) {
  using K = typename pm::KeyOf<T>::type;
  const K key = pm::order_key(value);
  const int bin = static_cast<int>(key >> (8 * sizeof(K) - kDigitBits));
  if (out.in_bin) {
    const bool keep = counted && out.in_bin[bin];
    const unsigned long long slot = warp_append(keep, out.key_count);
    if (keep && static_cast<int64_t>(slot) < out.key_cap) out.keys[slot] = static_cast<int64_t>(key);
  }
  if (out.top_v) {
    const bool keep = counted && static_cast<uint64_t>(key) >= out.top_min_key;
    const unsigned long long slot = warp_append(keep, out.top_count);
    if (keep && static_cast<int64_t>(slot) < out.top_cap) {
      pair_ids(mask, p, q, &out.top_i[slot], &out.top_j[slot]);
      out.top_v[slot] = value;
    }
  }
}

// Where pair_topk's candidates go (launchers.h, pair_collect_tile).
template <typename T>
struct CollectOutputs {
  uint64_t tau;
  T* above_v;
  int64_t *above_i, *above_j;
  int64_t above_cap;
  unsigned long long* above_count;
  unsigned long long* tie_count;
};

// The pair (p, q) of the mask with `value`: above tau it is appended to the
// candidates (while there is room; every one is counted); at tau its tie key
// (i << 32) | j (i < j its ids) is returned and counted; else INT64_MAX.
template <typename T>
__device__ inline int64_t collect_pair(const TileMask& mask, int64_t p, int64_t q, T value,
                                       const CollectOutputs<T>& out) {
  const uint64_t key = static_cast<uint64_t>(pm::order_key(value));
  if (key < out.tau) return INT64_MAX;
  int64_t i, j;
  pair_ids(mask, p, q, &i, &j);
  if (key == out.tau) {
    atomicAdd(out.tie_count, 1ull);
    return (i << 32) | j;
  }
  const unsigned long long slot = atomicAdd(out.above_count, 1ull);
  if (static_cast<int64_t>(slot) < out.above_cap) {
    out.above_v[slot] = value;
    out.above_i[slot] = i;
    out.above_j[slot] = j;
  }
  return INT64_MAX;
}

}  // namespace cuda
}  // namespace relkd
