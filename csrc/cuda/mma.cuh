// Tensor-core building blocks: the operand formats (bfloat16, float16, TF32;
// how kernels read and round them) and the warp-wide matrix products of each
// (fp32 accumulation, sm_80 and later). Products of two bf16, fp16 or TF32
// values are exact in fp32.
// Torch-free. The emulated build (RELKD_EMULATE) runs the same kernels with
// tests/cuda_emulation's mma, which reads the fragments where the PTX ISA's
// tables for mma.m16n8k16 (16-bit) and mma.m16n8k8 (TF32) place them.
//
// Staged operands are counted in 16-bit units: a 16-bit entry is one, a
// TF32 entry (32 bits) two. One mma step covers 16 units of k: m16n8k16 for
// 16-bit operands, m16n8k8 for TF32, whose fragments are the same registers
// (ldmatrix moves 16-byte rows either way). For the lane with g = lane / 4
// and t = lane % 4, D (16x8, fp32) += A (16 x k) * B (k x 8):
//   16-bit (two entries per register, the lower index in the lower half):
//     A: a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//        a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//     B: b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   TF32 (one entry per register):
//     A: a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//     B: b[0] = B[t][g]  b[1] = B[t+4][g]
//   D: d[i] = D[g + 8 * (i / 2)][2t + i % 2]
#pragma once

#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace relkd {
namespace cuda {

// v's bits as a To (a same-size type): float <-> uint32_t.
template <typename To, typename From>
__host__ __device__ inline To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  memcpy(&out, &v, sizeof(out));  // one register move on the GPU
  return out;
}
__host__ __device__ inline uint32_t float_bits(float v) { return bits_as<uint32_t>(v); }
__host__ __device__ inline float bits_float(uint32_t u) { return bits_as<float>(u); }

// f(Format<H>{}) for the format `operands` known at run time: a launcher's
// one switch from its argument to its kernel's template argument.
template <MmaOperands H>
using Format = std::integral_constant<MmaOperands, H>;

template <typename F>
inline void with_operands(MmaOperands operands, F&& f) {
  switch (operands) {
    case MmaOperands::Bf16: f(Format<MmaOperands::Bf16>{}); return;
    case MmaOperands::Fp16: f(Format<MmaOperands::Fp16>{}); return;
    case MmaOperands::Tf32: f(Format<MmaOperands::Tf32>{}); return;
    case MmaOperands::Tf32x3: f(Format<MmaOperands::Tf32x3>{}); return;
  }
}

// The bfloat16 nearest to v (ties to even) as its 16 bits; NaN stays NaN.
__host__ __device__ inline uint16_t bf16_bits(float v) {
  const uint32_t u = float_bits(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The float value of bfloat16 / float16 bits (exact: every such value is a
// float32).
__host__ __device__ inline float bf16_value(uint16_t h) { return bits_float(uint32_t(h) << 16); }
__host__ __device__ inline float fp16_value(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu;
  const uint32_t fraction = h & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (fraction << 13));  // inf, NaN
  if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (fraction << 13));
  const float subnormal = float(fraction) * (1.0f / 16777216.0f);  // fraction x 2^-24, exact
  return sign ? -subnormal : subnormal;
}

// The TF32 nearest to v (ties away from zero, as cvt.rna.tf32.f32): float32
// bits with the 13 lowest fraction bits cleared; NaN and infinity unchanged.
__host__ __device__ inline uint32_t tf32_bits(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(RELKD_EMULATE)
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(v));
  return out;
#else
  const uint32_t u = float_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // NaN, infinity
  return (u + 0x1000u) & 0xffffe000u;  // a carry may reach the exponent: correct
#endif
}

// 3xTF32 (after the cuBLAS / CUTLASS "fast accurate" float32 GEMMs): a
// float32 entry x is big + small, big = tf32(x), small = tf32(x - big) (x -
// big is exact), which holds x to about 2^-24 relative; a product is
// a_small b_big + a_big b_small + a_big b_big (a_small b_small, about
// 2^-22 of it, dropped), the small terms first. Staged as raw float32 bits
// and split in registers, after ldmatrix.
__device__ inline void split_tf32(const uint32_t* raw, uint32_t* big, uint32_t* small, int n) {
  for (int i = 0; i < n; ++i) {
    const float x = bits_float(raw[i]);
    big[i] = tf32_bits(x);
    small[i] = tf32_bits(x - bits_float(big[i]));
  }
}

// Staging units per operand entry (see above) and entries per 16-byte piece.
template <MmaOperands H>
constexpr int kUnitsPerEntry = H == MmaOperands::Tf32 || H == MmaOperands::Tf32x3 ? 2 : 1;
template <MmaOperands H>
constexpr int kPieceEntries = 8 / kUnitsPerEntry<H>;

// How the kernels read an operand format's embeddings (MmaTileInputs):
// 16-bit formats as their bits, rounded once by the glue (torch's
// conversion, round to nearest even) and staged as they are, half the bytes
// of float32; TF32 ones as float32, rounded (or split, 3xTF32) in the kernel.
template <MmaOperands H>
using OperandEntry = std::conditional_t<kUnitsPerEntry<H> == 2, float, uint16_t>;

// An entry's value as a float (exact).
template <MmaOperands H>
__host__ __device__ inline float entry_value(OperandEntry<H> v) {
  if constexpr (H == MmaOperands::Bf16)
    return bf16_value(v);
  else if constexpr (H == MmaOperands::Fp16)
    return fp16_value(v);
  else
    return v;
}

// An entry's value as the products see it: TF32 entries rounded as the
// fragments round them (3xTF32's big + small hold the float32 value).
template <MmaOperands H>
__host__ __device__ inline float operand_value(OperandEntry<H> v) {
  if constexpr (H == MmaOperands::Tf32)
    return bits_float(tf32_bits(v));
  else
    return entry_value<H>(v);
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
template <bool Trans>
__device__ inline void ldmatrix_x4_as(uint32_t (&r)[4], const uint16_t* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
#define RELKD_LDMATRIX(layout)                                              \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" layout ".shared.b16 "       \
               "{%0, %1, %2, %3}, [%4];\n"                                  \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])          \
               : "r"(address))
  if constexpr (Trans)
    RELKD_LDMATRIX(".trans");
  else
    RELKD_LDMATRIX("");
#undef RELKD_LDMATRIX
#else
  (void)row;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();  // sm_80+ only, as the mma below
#endif
}
__device__ inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  ldmatrix_x4_as<false>(r, row);
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  ldmatrix_x4_as<true>(r, row);
}
#endif

// The 32-bit word of shared memory at `at` (4-byte aligned), for fragments
// ldmatrix cannot deliver. The emulation checks the read against the
// staging's copies as it checks ldmatrix's.
#ifdef RELKD_EMULATE
inline uint32_t shared_word(const uint16_t* at) {
  ::relkd_emulation::check_read(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(at) & ~uintptr_t(15)));
  uint32_t word;
  memcpy(&word, at, sizeof(word));
  return word;
}
#else
__device__ inline uint32_t shared_word(const uint16_t* at) {
  return *reinterpret_cast<const uint32_t*>(at);
}
#endif

// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80):
// they bypass the registers and land while the warps compute. A thread
// issues its copies, closes them into a group (commit_copies), and before
// reading what any thread copied waits until at most `Pending` of its
// groups are in flight (wait_copies) and then passes a block barrier.
// copy_async_16 with !valid writes 16 zero bytes and reads nothing.
#ifdef RELKD_EMULATE
inline void copy_async_16(uint16_t* to, const void* from, bool valid) {
  ::relkd_emulation::copy_async_16(to, from, valid);
}
inline void commit_copies() { ::relkd_emulation::commit_copies(); }
template <int Pending>
inline void wait_copies() {
  ::relkd_emulation::wait_copies(Pending);
}
#else
__device__ inline void copy_async_16(uint16_t* to, const void* from, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(to));
  // .cg: through L2 only (a staged piece is read once per block); the
  // source size 0 makes the copy a zero fill.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(from),
               "r"(valid ? 16 : 0)
               : "memory");
#else
  (void)to;
  (void)from;
  (void)valid;
  __trap();  // sm_80+ only, as the mma below
#endif
}
__device__ inline void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int Pending>
__device__ inline void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}
#endif

// Fragments of TF32 operands, staged as float32, rounded to TF32 (as
// cvt.rna) after ldmatrix: mma would otherwise drop the low bits. The
// 16-bit formats' fragments pass as they are.
template <MmaOperands H>
__device__ inline void operand_fragment(uint32_t* r, int n) {
  if constexpr (H == MmaOperands::Tf32)
    for (int i = 0; i < n; ++i) r[i] = tf32_bits(bits_float(r[i]));
}

// d += a * b on the warp's fragments of one step of 16 staging units
// (mma.m16n8k16 for 16-bit operands, mma.m16n8k8 for TF32; row.col, fp32
// accumulation).
#ifdef RELKD_EMULATE
template <MmaOperands H>
inline void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using Format = ::relkd_emulation::MmaFormat;
  ::relkd_emulation::mma_step(d, a, b,
                              H == MmaOperands::Fp16   ? Format::Fp16
                              : H == MmaOperands::Tf32 ? Format::Tf32
                                                       : Format::Bf16);
}
#else
template <MmaOperands H>
__device__ inline void mma_step(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// One mma.sync of the given shape and input type, d += a b in place (the
// instruction text must be a literal: hence a macro, not a parameter).
#define RELKD_MMA(shape, type)                                                              \
  asm volatile("mma.sync.aligned." shape ".row.col.f32." type "." type ".f32 "             \
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"       \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
  if constexpr (H == MmaOperands::Bf16)
    RELKD_MMA("m16n8k16", "bf16");
  else if constexpr (H == MmaOperands::Fp16)
    RELKD_MMA("m16n8k16", "f16");
  else
    RELKD_MMA("m16n8k8", "tf32");
#undef RELKD_MMA
#else
  __trap();  // these tensor cores need sm_80; the glue never launches this below it
#endif
}
#endif

}  // namespace cuda
}  // namespace relkd
