// Tests on a chunk of kChunk consecutive values, written with GCC/Clang
// vector extensions. GCC 12 keeps the plain form (`any |= v[u] > thr` over a
// fixed-length chunk) scalar, one compare and branch per value; these
// compile to packed compares in the instruction set of the function they
// are inlined into (the target_clones of topk_sim.cpp pick AVX2/AVX-512).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace relkd {
namespace chunk {

constexpr int64_t kChunk = 16;  // values per test

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(32)));  // what comparisons give
  static constexpr int kLanes = 32 / sizeof(T);
};

// The helpers take and fill vectors by reference, never return them: in
// code built without AVX, GCC warns (-Wpsabi) about functions returning
// 32-byte vectors, whose ABI would differ.
template <typename T>
inline void load(const T* p, typename Vec<T>::type& v) {
  std::memcpy(&v, p, sizeof v);
}

template <typename T>
inline void splat(T x, typename Vec<T>::type& v) {
  for (int l = 0; l < Vec<T>::kLanes; ++l) v[l] = x;
}

// Whether any of the kChunk values at v satisfies the test: test(o, x, m)
// ORs into the lane mask m the lanes of x (the values at v + o) that pass.
template <typename T, typename Test>
inline bool any_of(const T* v, const Test& test) {
  typename Vec<T>::mask m = {};
  for (int o = 0; o < kChunk; o += Vec<T>::kLanes) {
    typename Vec<T>::type x;
    load(v + o, x);
    test(o, x, m);
  }
  uint64_t parts[sizeof m / 8];
  std::memcpy(parts, &m, sizeof m);
  uint64_t any = 0;
  for (uint64_t p : parts) any |= p;
  return any != 0;
}

template <typename T>
inline bool any_above(const T* v, T thr) {
  using V = typename Vec<T>::type;
  V t;
  splat(thr, t);
  return any_of(v, [&](int, const V& x, typename Vec<T>::mask& m) { m |= x > t; });
}

template <typename T>
inline bool any_scaled_above(const T* v, const T* scale, T thr) {
  using V = typename Vec<T>::type;
  V t;
  splat(thr, t);
  return any_of(v, [&](int o, const V& x, typename Vec<T>::mask& m) {
    V s;
    load(scale + o, s);
    m |= x * s > t;
  });
}

template <typename T>
inline bool any_at_least(const T* v, T thr) {
  using V = typename Vec<T>::type;
  V t;
  splat(thr, t);
  return any_of(v, [&](int, const V& x, typename Vec<T>::mask& m) { m |= x >= t; });
}

template <typename T>
inline bool any_in_range(const T* v, T lo, T hi) {
  using V = typename Vec<T>::type;
  V l, h;
  splat(lo, l);
  splat(hi, h);
  return any_of(v, [&](int, const V& x, typename Vec<T>::mask& m) { m |= (x >= l) & (x <= h); });
}

template <typename T>
inline bool any_nan(const T* v) {
  using V = typename Vec<T>::type;
  return any_of(v, [&](int, const V& x, typename Vec<T>::mask& m) { m |= x != x; });
}

}  // namespace chunk
}  // namespace relkd
