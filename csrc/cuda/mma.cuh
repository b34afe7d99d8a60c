// Tensor-core building blocks: bfloat16 rounding and the warp-wide
// m16n8k16 matrix product (bf16 inputs, fp32 accumulation, sm_80 and later).
// Torch-free. The emulated build (RELKD_EMULATE) runs the same kernels with
// tests/cuda_emulation's mma, which reads the fragments where the PTX ISA's
// tables for mma.m16n8k16 place them.
//
// Fragments of one warp-wide D (16x8, fp32) += A (16x16) * B (16x8), for
// the lane with g = lane / 4 and t = lane % 4 (two 16-bit entries per
// 32-bit register, the lower index in the lower half):
//   A: a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//      a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   B: b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   D: d[i] = D[g + 8 * (i / 2)][2t + i % 2]
#pragma once

#include <cstring>

#include "common.cuh"

namespace relkd {
namespace cuda {

// The bfloat16 nearest to v (ties to even) as its 16 bits; NaN stays NaN.
__host__ __device__ inline uint16_t bf16_bits(float v) {
#ifdef __CUDA_ARCH__
  uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Four 8x8 matrices of 16-bit entries from shared memory (ldmatrix .x4):
// lanes 8m .. 8m + 7 give the row addresses of matrix m (8 entries, 16-byte
// aligned); lane l receives entries 2 (l % 4), 2 (l % 4) + 1 of row l / 4
// of matrix m in r[m], the fragment layout of the table above. One
// instruction instead of four 32-bit shared loads per register set.
// ldmatrix_x4_trans delivers each matrix transposed: lane l receives entry
// l / 4 of rows 2 (l % 4) and 2 (l % 4) + 1, i.e. B's fragment where the
// staged rows run along B's k (mma.m16n8k16's .col operand from a [k][n]
// array).
#ifdef RELKD_EMULATE
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  ::relkd_emulation::ldmatrix_x4(r, row, false);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  ::relkd_emulation::ldmatrix_x4(r, row, true);
}
#else
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();  // sm_80+ only, as the mma below
#endif
}

__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}
#endif

#ifdef RELKD_EMULATE
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::relkd_emulation::mma_bf16_m16n8k16(d, a, b);
}
#else
__device__ inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4],
                                      const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // bf16 tensor cores need sm_80; the glue never launches this below it
#endif
}
#endif

}  // namespace cuda
}  // namespace relkd
