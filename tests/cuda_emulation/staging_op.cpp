// A test-only operator of the emulated build (tests/test_cuda_emulated.py):
// the tensor-core kernels' staging (csrc/cuda/pair_tile_mma.cuh's
// stage_step, which copies rows stored in the operand format 16 bytes at a
// time by cp.async, or entry by entry, into a block's staged rows; and
// operand_fragment, which rounds TF32 fragments after ldmatrix), and the
// rows pass's bf16 chunks of G x X's operand (csrc/cuda/pair_rows_mma.cuh's
// stage_chunk: float16 entries rounded to bfloat16), run on the host as the
// emulated kernels run them, for comparison with torch's own conversions.
// (On the GPU cvt instructions round instead; tests/test_cuda.py checks
// results.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "cuda/pair_rows_mma.cuh"

namespace {

namespace cuda = relkd::cuda;
using cuda::MmaOperands;
using cuda::OperandEntry;

// Every staging step of every 64-row block of x, as the 256 threads of a
// block stage them (this host thread taking each thread index in turn),
// into a staged block first filled with 0xab bytes: units of whole steps
// and whole row blocks, as 32-bit words.
template <MmaOperands H>
at::Tensor staged_words(const at::Tensor& x, bool vector, bool fragments) {
  constexpr int64_t kStep = cuda::kMmaDepth / cuda::kUnitsPerEntry<H>;  // entries per step
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t steps = (d + kStep - 1) / kStep, blocks = (n + cuda::kMmaEdge - 1) / cuda::kMmaEdge;
  const int64_t words = steps * cuda::kMmaDepth / 2;
  at::Tensor out = at::empty({blocks * cuda::kMmaEdge, words}, x.options().dtype(at::kLong));
  const auto* v = static_cast<const OperandEntry<H>*>(x.data_ptr());
  vector = vector && cuda::vector_rows(v, d);
  alignas(16) static uint16_t stage[cuda::MmaSquare::kColumnBufferEntries];  // one step
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t step = 0; step < steps; ++step) {
      std::memset(stage, 0xab, sizeof(stage));
      for (unsigned t = 0; t < cuda::kThreads; ++t) {
        threadIdx.x = t;
        cuda::stage_step<H>(v, n, d, b * cuda::kMmaEdge, step * kStep, vector, stage);
      }
      threadIdx.x = 0;
      cuda::commit_copies();
      cuda::wait_copies<0>();
      for (int r = 0; r < cuda::kMmaEdge; ++r) {
        uint32_t row[cuda::kMmaDepth / 2];
        std::memcpy(row, stage + r * cuda::kMmaStride, sizeof(row));
        for (int w = 0; w < cuda::kMmaDepth / 2; w += 4)
          if (fragments) cuda::operand_fragment<H>(row + w, 4);
        for (int w = 0; w < cuda::kMmaDepth / 2; ++w)
          o[(b * cuda::kMmaEdge + r) * words + step * cuda::kMmaDepth / 2 + w] = row[w];
      }
    }
  return out;
}

// The rows pass's chunks of G x X's operand (stage_chunk: bf16 rows as
// stored, by cp.async where aligned; float16 ones rounded to bf16), as the
// 256 threads of a block stage each chunk (kRowsCols rows, 64 entries) into
// a buffer first filled with 0xab bytes: the first d entries of each row, as
// 32-bit words (d even).
template <MmaOperands H>
at::Tensor bf16_words(const at::Tensor& x, bool vector) {
  const int64_t n = x.size(0), d = x.size(1), words = d / 2;
  const int64_t rows = cuda::kChunkK<H>, entries = cuda::kMmaEdge;
  at::Tensor out = at::empty({n, words}, x.options().dtype(at::kLong));
  const auto* v = static_cast<const OperandEntry<H>*>(x.data_ptr());
  int64_t* o = out.data_ptr<int64_t>();
  vector = vector && cuda::vector_rows(v, d);
  alignas(16) static uint16_t chunk[cuda::kChunkEntries<H>];
  for (int64_t c0 = 0; c0 < n; c0 += rows)
    for (int64_t d0 = 0; d0 < d; d0 += entries) {
      std::memset(chunk, 0xab, sizeof(chunk));
      for (unsigned t = 0; t < cuda::kThreads; ++t) {
        threadIdx.x = t;
        cuda::stage_chunk<H>(v, n, d, c0, d0, vector, chunk);
      }
      threadIdx.x = 0;
      cuda::commit_copies();
      cuda::wait_copies<0>();
      for (int64_t r = 0; r < std::min(rows, n - c0); ++r)
        for (int64_t w = 0; w < std::min(entries, d - d0) / 2; ++w) {
          uint32_t word;
          std::memcpy(&word, chunk + r * cuda::kChunkStride<H> + 2 * w, sizeof(word));
          o[(c0 + r) * words + d0 / 2 + w] = word;
        }
    }
  return out;
}

// x: 2-D, stored as the format's kernels read it (format: 0 bf16, 1 fp16,
// 2 TF32, MmaOperands; bfloat16, float16 or float32 x); vector: take the
// 16-byte copies where the rows allow them; fragments: the words as
// operand_fragment hands them to mma (TF32 rounded). Returns the staged
// words (whole 64-row blocks x whole steps, as int64). bf16: the rows
// pass's G x X pieces instead (16-bit formats).
at::Tensor stage_pieces(const at::Tensor& x_in, int64_t format, bool vector, bool bf16,
                        bool fragments) {
  static const at::ScalarType stored[] = {at::kBFloat16, at::kHalf, at::kFloat};
  TORCH_CHECK_VALUE(format >= 0 && format <= 2, "format must be 0, 1 or 2, got ", format);
  TORCH_CHECK_VALUE(x_in.scalar_type() == stored[format] && x_in.dim() == 2,
                    "x must be a 2-D ", stored[format], " tensor");
  TORCH_CHECK_VALUE(!bf16 || format != 2, "bf16 pieces come from 16-bit formats");
  const at::Tensor x = x_in.contiguous();
  switch (static_cast<MmaOperands>(format)) {
    case MmaOperands::Bf16:
      return bf16 ? bf16_words<MmaOperands::Bf16>(x, vector)
                  : staged_words<MmaOperands::Bf16>(x, vector, fragments);
    case MmaOperands::Fp16:
      return bf16 ? bf16_words<MmaOperands::Fp16>(x, vector)
                  : staged_words<MmaOperands::Fp16>(x, vector, fragments);
    default: return staged_words<MmaOperands::Tf32>(x, vector, fragments);
  }
}

// Whether the emulated cp.async copies land as they are issued (true) or at
// the wait that covers them (false, the default); returns the previous
// setting. The kernels must be right either way.
bool set_copies_land_early(bool early) {
  return relkd_emulation::copies_land_early.exchange(early);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(relkd_emulated, m) {
  m.def("stage_pieces(Tensor x, int format, bool vector, bool bf16=False, "
        "bool fragments=False) -> Tensor");
  m.impl("stage_pieces", c10::DispatchKey::CPU, TORCH_FN(stage_pieces));
  m.def("set_copies_land_early(bool early) -> bool", &set_copies_land_early);
}
