// Tests on a chunk of kChunk consecutive values, written with GCC/Clang
// vector extensions. GCC 12 keeps the plain form (`any |= v[u] > thr` over a
// fixed-length chunk) scalar, one compare and branch per value; these
// compile to packed compares in the instruction set of the function they
// are inlined into (the target_clones of topk_sim.cpp pick AVX2/AVX-512).
#pragma once

#include <cstdint>
#include <cstring>

namespace relkd {
namespace chunk {

constexpr int64_t kChunk = 16;  // values per test

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T);
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
inline vec_t<T> load(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline vec_t<T> splat(T x) {
  vec_t<T> v;
  for (int l = 0; l < Vec<T>::kLanes; ++l) v[l] = x;
  return v;
}

// Whether lane_mask(offset) (a lane mask of the values at offset, offset +
// 1, ...) holds for any of the kChunk values.
template <typename T, typename LaneMask>
inline bool any_of(LaneMask lane_mask) {
  auto m = lane_mask(0);
  for (int o = Vec<T>::kLanes; o < kChunk; o += Vec<T>::kLanes) m |= lane_mask(o);
  uint64_t parts[sizeof m / 8];
  std::memcpy(parts, &m, sizeof m);
  uint64_t any = 0;
  for (uint64_t p : parts) any |= p;
  return any != 0;
}

template <typename T>
inline bool any_above(const T* v, T thr) {
  const auto t = splat(thr);
  return any_of<T>([&](int o) { return load(v + o) > t; });
}

template <typename T>
inline bool any_scaled_above(const T* v, const T* scale, T thr) {
  const auto t = splat(thr);
  return any_of<T>([&](int o) { return load(v + o) * load(scale + o) > t; });
}

template <typename T>
inline bool any_at_least(const T* v, T thr) {
  const auto t = splat(thr);
  return any_of<T>([&](int o) { return load(v + o) >= t; });
}

template <typename T>
inline bool any_in_range(const T* v, T lo, T hi) {
  const auto l = splat(lo), h = splat(hi);
  return any_of<T>([&](int o) {
    const auto x = load(v + o);
    return (x >= l) & (x <= h);
  });
}

template <typename T>
inline bool any_nan(const T* v) {
  return any_of<T>([&](int o) {
    const auto x = load(v + o);
    return x != x;
  });
}

}  // namespace chunk
}  // namespace relkd
