// A test-only operator of the emulated build (tests/test_cuda_emulated.py):
// the tensor-core kernels' staging loads (csrc/cuda/pair_tile_mma.cuh's
// load_piece_at), which read rows stored in the operand format 16 bytes or
// one entry at a time (16-bit entries as they are, float32 ones rounded to
// TF32), and the rows pass's bf16 pieces of G x X's operand
// (csrc/cuda/pair_rows_mma.cuh's as_bf16: float16 entries rounded to
// bfloat16), run on the host as the emulated kernels run them, for
// comparison with torch's own conversions. (On the GPU cvt instructions
// round instead; tests/test_cuda.py checks results.)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/pair_rows_mma.cuh"

namespace {

using relkd::cuda::MmaOperands;
using relkd::cuda::OperandEntry;

template <MmaOperands H>
at::Tensor pieces_of(const at::Tensor& x, bool vector, bool bf16) {
  const int64_t n = x.size(0), d = x.size(1), per_piece = relkd::cuda::kPieceEntries<H>;
  const int64_t pieces = (d + per_piece - 1) / per_piece;
  at::Tensor out = at::empty({n, pieces, 4}, x.options().dtype(at::kLong));
  const auto* v = static_cast<const OperandEntry<H>*>(x.data_ptr());
  int64_t* o = out.data_ptr<int64_t>();
  vector = vector && relkd::cuda::vector_rows(v, d);
  for (int64_t p = 0; p < n; ++p)
    for (int64_t i = 0; i < pieces; ++i) {
      auto piece = relkd::cuda::load_piece_at<H>(v, n, d, p, i * per_piece, vector);
      if constexpr (relkd::cuda::kPieceEntries<H> == 8)
        if (bf16) piece = relkd::cuda::as_bf16<H>(piece);
      for (int w = 0; w < 4; ++w) o[(p * pieces + i) * 4 + w] = piece.bits[w];
    }
  return out;
}

// x: 2-D, stored as the format's kernels read it (format: 0 bf16, 1 fp16,
// 2 TF32, MmaOperands; bfloat16, float16 or float32 x); vector: take the
// 16-byte loads where the rows allow them; bf16: the rows pass's G x X
// pieces (16-bit formats). Returns the 4 words of each 16-byte piece of
// each row (pieces x 4 per row, as int64), entries past the row's end 0.
at::Tensor stage_pieces(const at::Tensor& x_in, int64_t format, bool vector, bool bf16) {
  static const at::ScalarType stored[] = {at::kBFloat16, at::kHalf, at::kFloat};
  TORCH_CHECK_VALUE(format >= 0 && format <= 2, "format must be 0, 1 or 2, got ", format);
  TORCH_CHECK_VALUE(x_in.scalar_type() == stored[format] && x_in.dim() == 2,
                    "x must be a 2-D ", stored[format], " tensor");
  TORCH_CHECK_VALUE(!bf16 || format != 2, "bf16 pieces come from 16-bit formats");
  const at::Tensor x = x_in.contiguous();
  switch (static_cast<MmaOperands>(format)) {
    case MmaOperands::Bf16: return pieces_of<MmaOperands::Bf16>(x, vector, bf16);
    case MmaOperands::Fp16: return pieces_of<MmaOperands::Fp16>(x, vector, bf16);
    default: return pieces_of<MmaOperands::Tf32>(x, vector, false);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(relkd_emulated, m) {
  m.def("stage_pieces(Tensor x, int format, bool vector, bool bf16=False) -> Tensor");
  m.impl("stage_pieces", c10::DispatchKey::CPU, TORCH_FN(stage_pieces));
}
